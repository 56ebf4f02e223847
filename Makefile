# The two commands a newcomer needs are `make run` and `make test`; both install what is missing.
.PHONY: run test deps build lint unit clean

deps:
	@scripts/install-deps.sh

# Build release and run everything in one process over a private PostgreSQL cluster in ./.keel.
run: deps
	cargo build --release --bin keel
	./target/release/keel up

# Formatting, lints, then every test: unit tests and the API suite against real PostgreSQL.
test: deps lint
	cargo test --workspace --all-targets

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --workspace

clean:
	cargo clean
	rm -rf .keel
