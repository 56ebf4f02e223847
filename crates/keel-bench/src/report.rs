//! BENCHMARKS.md (for people) and BENCHMARKS.json (the raw figures) from one run.

use std::fmt::Write;
use std::process::Command;

use serde::Serialize;

use crate::scenarios::ScenarioResult;
use crate::side_effects::SideEffects;
use crate::storage::Storage;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory: String,
    pub postgres: String,
    pub keel: String,
    pub commit: String,
    pub rustc: String,
    pub nats_server: String,
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

pub fn machine(postgres: &str) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu: field(&cpuinfo, "model name"),
        memory: field(&meminfo, "MemTotal"),
        postgres: first_line(postgres, &["--version"]),
        keel: env!("CARGO_PKG_VERSION").to_owned(),
        commit: first_line("git", &["rev-parse", "--short", "HEAD"]),
        rustc: first_line("rustc", &["--version"]),
        nats_server: ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .map_or_else(|| "no nats-server".into(), |p| first_line(p, &["--version"])),
    }
}

/// Whether a scenario met its target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// A smoke run measures briefly and small: its figures prove the harness, not Keel.
    Smoke,
    Met,
    NotMet,
    /// Measured, but not judged against the target.
    Unjudged,
    /// The feature the scenario measures does not exist yet.
    NotYet,
}

pub fn verdict(r: &ScenarioResult, smoke: bool) -> Verdict {
    match (&r.keel, r.met) {
        (None, _) => Verdict::NotYet,
        (Some(_), _) if smoke => Verdict::Smoke,
        (Some(_), Some(true)) => Verdict::Met,
        (Some(_), Some(false)) => Verdict::NotMet,
        (Some(_), None) => Verdict::Unjudged,
    }
}

/// One scenario's line on the console, as the run goes.
pub fn console_line(r: &ScenarioResult, smoke: bool) -> String {
    let Some(k) = &r.keel else {
        return format!("{}: not yet", r.id);
    };
    let target = match verdict(r, smoke) {
        Verdict::Smoke => "not judged (smoke run)",
        Verdict::Met => "met",
        Verdict::NotMet => "NOT met",
        Verdict::Unjudged | Verdict::NotYet => "not judged",
    };
    format!(
        "{}: {:.0}/s p50 {:.2} ms p99 {:.2} ms errors {} | baseline {} /s | ratio {} | target {}",
        r.id,
        k.per_second,
        k.p50_ms,
        k.p99_ms,
        k.errors,
        cell(r.baseline_per_second, 0),
        cell(r.ratio, 2),
        target
    )
}

/// The scenario's further measurements ([`ScenarioResult::also`]), one line each, for the console
/// and BENCHMARKS.md.
pub fn also_lines(r: &ScenarioResult) -> Vec<String> {
    r.also
        .iter()
        .map(|(name, k)| {
            format!(
                "{} {name}: {:.0}/s p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms | {} answered, {} refused, {} failed, over {:.2} s",
                r.id, k.per_second, k.p50_ms, k.p99_ms, k.p999_ms, k.requests, k.refused, k.errors, k.seconds
            )
        })
        .collect()
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

pub fn markdown(
    machine: &Machine,
    results: &[ScenarioResult],
    effects: &SideEffects,
    storage: &Storage,
    command: &str,
    smoke: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Keel benchmarks\n");
    if smoke {
        let _ = writeln!(
            md,
            "**A smoke run**: tiny durations and data, to prove the harness works. Not figures to quote.\n"
        );
    }
    let _ = writeln!(md, "Written by `{command}`; every figure below comes from that one run, with each scenario's");
    let _ = writeln!(md, "baseline measured in the same run on the same machine. Load generator: `keel-bench` (see");
    let _ = writeln!(md, "`crates/keel-bench/src/load.rs` for why not wrk), which shares the machine with Keel.\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, {}, {} RAM; {}; {}; built by {}; keel {} at {}.\n",
        machine.cores,
        machine.cpu,
        machine.memory,
        machine.postgres,
        machine.nats_server,
        machine.rustc,
        machine.keel,
        machine.commit
    );
    let _ = writeln!(
        md,
        "| scenario | keel /s | p50 ms | p99 ms | p99.9 ms | errors | baseline /s | ratio | target | met |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let keel = r.keel.as_ref();
        let met = match verdict(r, smoke) {
            Verdict::Smoke => "smoke: not judged",
            Verdict::Met => "yes",
            Verdict::NotMet => "**no**",
            Verdict::Unjudged => "not judged",
            Verdict::NotYet => "not yet",
        };
        let _ = writeln!(
            md,
            "| {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.id,
            r.name,
            cell(keel.map(|k| k.per_second), 0),
            cell(keel.map(|k| k.p50_ms), 2),
            cell(keel.map(|k| k.p99_ms), 2),
            cell(keel.map(|k| k.p999_ms), 2),
            keel.map_or("—".into(), |k| k.errors.to_string()),
            cell(r.baseline_per_second, 0),
            cell(r.ratio, 2),
            r.target,
            met
        );
    }
    let _ = writeln!(md, "\n## How each line was measured\n");
    for r in results {
        let _ = writeln!(
            md,
            "- **{}** — baseline: {}. {}{}",
            r.id,
            if r.baseline_name.is_empty() { "—" } else { &r.baseline_name },
            if r.command.is_empty() { String::new() } else { format!("Command: {}. ", r.command) },
            r.notes
        );
        for line in also_lines(r) {
            let _ = writeln!(md, "  - {line}");
        }
    }
    let _ = writeln!(md, "\n## Side effects\n");
    let _ = writeln!(md, "| measure | figure |\n|---|---|");
    let _ = writeln!(
        md,
        "| webhook deliveries to a fast local receiver | {:.0} /s ({} deliveries) |",
        effects.webhook_deliveries_per_second, effects.webhook_deliveries
    );
    let lag_met = if smoke {
        "smoke: not judged"
    } else if effects.index_lag_p99_ms < 2000.0 {
        "met"
    } else {
        "**not met**"
    };
    let _ = writeln!(
        md,
        "| search index lag (event → searchable), target p99 < 2 s | p50 {:.1} ms, p99 {:.1} ms over {} updates ({lag_met}) |",
        effects.index_lag_p50_ms, effects.index_lag_p99_ms, effects.index_lag_samples
    );
    let _ = writeln!(
        md,
        "| events through NATS JetStream (outbox → stream → consumer → ack) | {} |\n",
        effects.jetstream_events_per_second.map_or("not measured: no nats-server".into(), |r| format!(
            "{r:.0} events/s ({} events)",
            effects.jetstream_events
        ))
    );
    for command in &effects.commands {
        let _ = writeln!(md, "- {command}");
    }
    storage_section(&mut md, storage);
    // Written by hand from profiles (see the file for how they were taken); kept beside the harness.
    let _ = writeln!(md, "\n{}", include_str!("../PROFILES.md").trim_end());
    md
}

/// Bytes per user on a shard: each shard and all of them, then each table's rows and bytes per user.
fn storage_section(md: &mut String, storage: &Storage) {
    let _ = writeln!(md, "\n## Storage\n");
    let Some(all) = storage.total() else {
        let _ = writeln!(md, "Not measured in this run.");
        return;
    };
    let _ = writeln!(
        md,
        "Bytes per user on a shard, for the capacity plan: read from the shard databases of the main `keel up` after \
         every scenario that writes to them (the seed's sign-ups, deposits and carts; S3's and S5's checkouts, S5's \
         carts and likes, S6's sign-ins) and once \
         their jobs were done. Each shard's users are its `users` rows; each figure is the shard's bytes, {}, divided \
         by its users. `pg_total_relation_size` counts pages: the dead rows not yet vacuumed and the free space in them \
         are in it, as on a live shard, and with few users the tables' first pages weigh on each user. The users' \
         rows are the benchmark's, not a shop's: scale each table's bytes per user by its rows per user below to \
         another mix. Finished jobs stay in keel_jobs for `KEEL_JOB_RETENTION` (a day by default), \
         so the queue's size follows the traffic of a day, not the users; and shard 0's holds S4's no-op jobs \
         (keel.ping, none of them a user's).\n",
        if storage.empty.is_some() {
            "less a freshly migrated empty shard's"
        } else {
            "with an empty shard's fixed size not subtracted (none could be made)"
        }
    );
    let header: Vec<&str> = storage.per_user.iter().map(|p| p.scope.as_str()).collect();
    let _ = writeln!(md, "| measure | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(header.len()));
    let row = |md: &mut String, name: &str, value: &dyn Fn(&crate::storage::PerUser) -> String| {
        let cells: Vec<String> = storage.per_user.iter().map(value).collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    };
    row(md, "users", &|p| p.users.to_string());
    row(md, "user tables (tables + indexes + TOAST), bytes per user", &|p| format!("{:.0}", p.user_tables_bytes));
    row(md, "queue (keel_jobs + keel_processed_events), bytes per user", &|p| format!("{:.0}", p.queue_bytes));
    row(md, "whole database (pg_database_size), bytes per user", &|p| format!("{:.0}", p.database_bytes));
    row(md, "S4's no-op jobs (keel.ping) in keel_jobs, rows", &|p| p.bench_jobs.to_string());
    let _ = writeln!(md, "\nOver all {} shards ({} users):\n", storage.shards.len(), all.users);
    let _ = writeln!(md, "| table | rows | rows per user | bytes per user |\n|---|---|---|---|");
    for t in &storage.tables {
        let _ = writeln!(md, "| {} | {} | {:.2} | {:.0} |", t.table, t.rows, t.rows_per_user, t.bytes_per_user);
    }
    let _ = writeln!(md);
    for command in &storage.commands {
        let _ = writeln!(md, "- {command}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Outcome;

    fn result(id: &'static str, measured: bool, met: Option<bool>) -> ScenarioResult {
        ScenarioResult {
            id,
            name: "a scenario",
            keel: measured.then(|| Outcome { requests: 10, per_second: 5.0, ..Outcome::default() }),
            baseline_per_second: Some(10.0),
            ratio: Some(0.5),
            target: "≥ 0.8× its baseline".into(),
            met,
            ..ScenarioResult::default()
        }
    }

    fn machine() -> Machine {
        Machine {
            cores: 2,
            cpu: "cpu".into(),
            memory: "1 kB".into(),
            postgres: "postgres".into(),
            keel: "0".into(),
            commit: "abc".into(),
            rustc: "rustc".into(),
            nats_server: "no nats-server".into(),
        }
    }

    /// No Rust value formatting (`Some(…)`, `None`, `true`/`false`) in what people read.
    fn assert_plain(text: &str) {
        for debug in ["Some(", "None", "true", "false"] {
            assert!(!text.contains(debug), "{debug} in {text}");
        }
    }

    #[test]
    fn a_smoke_run_judges_no_target() {
        let results = [result("S1", true, Some(false)), result("S2", true, Some(true)), result("S3", false, None)];
        let lines: Vec<String> = results.iter().map(|r| console_line(r, true)).collect();
        assert!(lines[0].ends_with("| target not judged (smoke run)"), "{}", lines[0]);
        assert!(lines[1].ends_with("| target not judged (smoke run)"), "{}", lines[1]);
        assert_eq!(lines[2], "S3: not yet");
        let md = markdown(&machine(), &results, &SideEffects::default(), &Storage::default(), "make bench-smoke", true);
        assert!(md.contains("| smoke: not judged |"), "{md}");
        assert!(!md.contains("**no**") && !md.contains("| yes |"), "{md}");
        for text in lines.iter().chain([&md]) {
            assert_plain(text);
        }
    }

    #[test]
    fn further_measurements_get_a_line_each_on_the_console_and_in_the_report() {
        let mut r = result("S6", true, Some(true));
        assert!(also_lines(&r).is_empty());
        r.also.insert(
            "sign-ins",
            Outcome {
                requests: 198,
                errors: 1,
                refused: 1,
                seconds: 2.5,
                per_second: 79.2,
                p50_ms: 1200.0,
                p99_ms: 2400.5,
                p999_ms: 2450.0,
            },
        );
        r.also.insert("reads unloaded", Outcome { requests: 10, per_second: 5.0, ..Outcome::default() });
        let lines = also_lines(&r);
        assert_eq!(
            lines,
            [
                "S6 reads unloaded: 5/s p50 0.00 ms p99 0.00 ms p99.9 0.00 ms | 10 answered, 0 refused, 0 failed, over 0.00 s",
                "S6 sign-ins: 79/s p50 1200.00 ms p99 2400.50 ms p99.9 2450.00 ms | 198 answered, 1 refused, 1 failed, over 2.50 s",
            ]
        );
        let md = markdown(&machine(), &[r], &SideEffects::default(), &Storage::default(), "make bench", false);
        assert!(md.contains(&format!("  - {}\n", lines[1])), "{md}");
        assert_plain(&md);
    }

    #[test]
    fn storage_comes_after_the_side_effects_per_shard_and_per_table() {
        let mut storage = crate::storage::example(true);
        storage.commands.push("how it was measured".into());
        let md = markdown(&machine(), &[], &SideEffects::default(), &storage, "make bench", false);
        let (effects, storage_at) = (md.find("\n## Side effects\n").unwrap(), md.find("\n## Storage\n").unwrap());
        assert!(effects < storage_at, "{md}");
        let section = &md[storage_at..md[storage_at + 1..].find("\n## ").map_or(md.len(), |end| storage_at + 1 + end)];
        for line in [
            "| measure | keel_shard_0 | keel_shard_1 | all shards |",
            "|---|---|---|---|",
            "| users | 10 | 30 | 40 |",
            "| user tables (tables + indexes + TOAST), bytes per user | 1300 | 2600 | 2275 |",
            "| queue (keel_jobs + keel_processed_events), bytes per user | 200 | 400 | 350 |",
            "| whole database (pg_database_size), bytes per user | 2000 | 4000 | 3500 |",
            "| S4's no-op jobs (keel.ping) in keel_jobs, rows | 500 | 0 | 500 |",
            "Over all 2 shards (40 users):",
            "| table | rows | rows per user | bytes per user |",
            "| orders | 40 | 1.00 | 175 |",
            "| keel_processed_events | 40 | 1.00 | 175 |",
            "- how it was measured",
        ] {
            assert!(section.lines().any(|l| l == line), "{line} not in {section}");
        }
        assert!(section.contains("less a freshly migrated empty shard's"), "{section}");
        assert!(section.contains("\n| users | 40 | 1.00 | 175 |\n| wallets |"), "users first: {section}");
        assert_plain(section);

        let md =
            markdown(&machine(), &[], &SideEffects::default(), &crate::storage::example(false), "make bench", false);
        assert!(md.contains("with an empty shard's fixed size not subtracted (none could be made)"), "{md}");
        assert_plain(&md[md.find("## Storage").unwrap()..]);
        let md = markdown(&machine(), &[], &SideEffects::default(), &Storage::default(), "make bench", false);
        assert!(md.contains("## Storage\n\nNot measured in this run.\n"), "{md}");
    }

    #[test]
    fn a_full_run_says_whether_each_target_was_met() {
        let results = [result("S1", true, Some(false)), result("S2", true, Some(true)), result("S3", false, None)];
        let lines: Vec<String> = results.iter().map(|r| console_line(r, false)).collect();
        assert_eq!(lines[0], "S1: 5/s p50 0.00 ms p99 0.00 ms errors 0 | baseline 10 /s | ratio 0.50 | target NOT met");
        assert!(lines[1].ends_with("| target met"), "{}", lines[1]);
        assert_eq!(console_line(&result("S4", true, None), false).rsplit("| ").next(), Some("target not judged"));
        let md = markdown(&machine(), &results, &SideEffects::default(), &Storage::default(), "make bench", false);
        assert!(md.contains("| **no** |") && md.contains("| yes |") && md.contains("| not yet |"), "{md}");
        for text in lines.iter().chain([&md]) {
            assert_plain(text);
        }
    }
}
