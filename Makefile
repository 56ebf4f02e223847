# The two commands a newcomer needs are `make run` and `make test`; both install what is missing.
.PHONY: run test deps deps-test build lint clean bench bench-smoke example-flow

# What `keel up` needs (PostgreSQL's server binaries), and what only the tests need on top of it
# (nats-server, redis-server, a Python SMTP server): `make run` installs no test peer.
deps:
	@scripts/install-deps.sh

deps-test:
	@scripts/install-deps.sh --test

# Build release and run everything in one process over a private PostgreSQL cluster in ./.keel.
run: deps
	cargo build --release --bin keel
	./target/release/keel up

# Formatting, lints, the benchmark smoke run, then every test: unit tests and the API suite against real PostgreSQL,
# SMTP, HTTP receivers, Redis and NATS; then the checkout and webhook tests again with events carried by NATS JetStream.
# The bench smoke run and README's example flow go first so that cargo test's summary closes the output.
test: deps-test lint bench-smoke example-flow
	cargo test --workspace --all-targets
	KEEL_TEST_NATS=1 cargo test -p keel --test api -- checkout:: webhooks::

# Every scenario against a release build, with same-run baselines: writes BENCHMARKS.md and .json.
bench: deps-test
	cargo build --release --bin keel --bin keel-bench
	./target/release/keel-bench run --out .

# The same harness, briefly and small (debug build): proves it works; judges no targets.
bench-smoke: deps-test
	cargo build --bin keel --bin keel-bench
	./target/debug/keel-bench run --smoke --out target/bench-smoke

# README's worked example, run as written against a `keel up` of its own (debug build, temporary data).
example-flow: deps
	cargo build --bin keel
	scripts/example-flow.sh target/debug/keel

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --workspace

clean:
	cargo clean
	rm -rf .keel
