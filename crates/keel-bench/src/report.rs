//! BENCHMARKS.md (for people) and BENCHMARKS.json (the raw figures) from one run.

use std::fmt::Write;
use std::process::Command;

use serde::Serialize;

use crate::scenarios::ScenarioResult;
use crate::side_effects::SideEffects;

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

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

pub fn markdown(
    machine: &Machine,
    results: &[ScenarioResult],
    effects: &SideEffects,
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
        let met = match r.met {
            _ if smoke && r.keel.is_some() => "smoke: not judged",
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not yet",
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
    // Written by hand from profiles (see the file for how they were taken); kept beside the harness.
    let _ = writeln!(md, "\n{}", include_str!("../PROFILES.md").trim_end());
    md
}
