//! `keel shards`: status, add, move, rebalance, with the same code as the admin API's routes
//! (`admin::shards`, `admin::rebalance`, `db::moves`), and a progress bar for moves.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use uuid::Uuid;

use super::external_databases;
use crate::admin::rebalance::{self, RebalanceError};
use crate::admin::shards as admin_shards;
use crate::config::Config;
use crate::db::moves::{self, CancelError, Move, MoveState, StartError};
use crate::db::shard_map::{self, AddError};
use crate::db::{ConnectError, Databases, PoolOptions};
use crate::shutdown::Stop;

#[derive(Subcommand)]
pub(super) enum ShardsCommand {
    /// Each shard's buckets, users and whether it answers, and the moves in progress.
    Status,
    /// Add an empty database as a new shard, with no buckets yet (as POST /v1/admin/shards).
    Add {
        /// Its connection string (URL or key=value), as every Keel process will reach it. Stored in
        /// the catalogue: prefer one without a password.
        url: String,
    },
    /// Move buckets to a shard (as POST /v1/admin/shards/moves), carrying the move out until it is
    /// done, with its progress on stderr.
    Move {
        /// Bucket numbers (0 to 1023), from whichever shards hold them: `1,2,5-9`, and `0-1022/2`
        /// for every second one.
        #[arg(long, value_parser = parse_buckets)]
        buckets: Buckets,
        /// The shard they move to.
        #[arg(long)]
        to: u16,
    },
    /// Move buckets so that every shard has about as many users (as POST
    /// /v1/admin/shards/rebalance), carrying the moves out until they are done.
    Rebalance {
        /// Only show the plan; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cancel a move whose map has not switched yet (as DELETE /v1/admin/shards/moves/{id}), and
    /// carry out its undoing until it is recorded failed.
    Cancel {
        /// The move's id.
        id: Uuid,
    },
}

/// A list of buckets as `--buckets` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Buckets(Vec<u16>);

/// `1,2,5-9` (and `a-b/step`, as `keel shards status` shows a shard's buckets) as bucket numbers.
fn parse_buckets(text: &str) -> Result<Buckets, String> {
    let last = keel_shard::BUCKETS - 1;
    let number = |n: &str| -> Result<u16, String> {
        let parsed: u16 = n.trim().parse().map_err(|_| format!("{n:?} is not a bucket number"))?;
        if parsed > last {
            return Err(format!("{parsed} is not a bucket (0 to {last})"));
        }
        Ok(parsed)
    };
    let mut buckets = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u16 = step.trim().parse().map_err(|_| format!("{step:?} is not a step"))?;
                if step == 0 {
                    return Err(format!("{part}: the step must be at least 1"));
                }
                (range, step)
            }
            None => (part, 1),
        };
        match range.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to {
                    return Err(format!("{part}: a range goes from the lower number to the higher"));
                }
                buckets.extend((from..=to).step_by(usize::from(step)));
            }
            None if step == 1 => buckets.push(number(range)?),
            None => return Err(format!("{part}: a step needs a range (a-b/step)")),
        }
    }
    if buckets.is_empty() {
        return Err("name at least one bucket, as 1,2,5-9".into());
    }
    buckets.sort_unstable();
    buckets.dedup();
    Ok(Buckets(buckets))
}
/// Why a `keel shards` command stopped: its exit status is 2 for the first, 1 for the second.
#[derive(Debug)]
enum ShardsError {
    /// What was asked cannot be done as asked: a bucket or shard that does not exist, a setting
    /// missing.
    Usage(String),
    /// It was tried, and did not work, or a move failed.
    Failed(String),
}

impl From<ConnectError> for ShardsError {
    fn from(e: ConnectError) -> ShardsError {
        ShardsError::Failed(e.to_string())
    }
}

/// `keel shards …`: its own main, for its exit statuses (0 done, 1 failed, 2 bad usage).
pub(super) fn main(command: ShardsCommand) -> ExitCode {
    let outcome = Config::load().map_err(|e| ShardsError::Usage(e.to_string())).and_then(|mut config| {
        // These commands speak for themselves, on stdout and stderr; the log (JSON lines on
        // stderr) would bury what they say, and the progress lines with it. Errors only, unless
        // KEEL_LOG in the environment asks for more.
        if std::env::var_os("KEEL_LOG").is_none() {
            config.log = "error".to_owned();
        }
        let format = crate::telemetry::LogFormat::or_by_terminal(config.log_format);
        crate::telemetry::init_logging(&config.log, format).map_err(ShardsError::Usage)?;
        let runtime = tokio::runtime::Runtime::new()
            .map_err(|e| ShardsError::Failed(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(shards(command, &config))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(ShardsError::Usage(message)) => {
            eprintln!("keel: {message}");
            ExitCode::from(2)
        }
        Err(ShardsError::Failed(message)) => {
            eprintln!("keel: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Connections per database: one command's few statements, the shards counted once each at a time,
/// and the mover's steps.
const SHARDS_POOL_SIZE: usize = 4;

async fn shards(command: ShardsCommand, config: &Config) -> Result<(), ShardsError> {
    let (catalog, shard_urls) = external_databases(config).map_err(|e| ShardsError::Usage(e.to_string()))?;
    let options = PoolOptions { size: SHARDS_POOL_SIZE, ..PoolOptions::from(config) };
    let db = Arc::new(Databases::open(catalog, shard_urls, options).await?);
    match command {
        ShardsCommand::Status => print_status(&db).await,
        ShardsCommand::Add { url } => {
            let shard = admin_shards::add_shard(&db, &url).await.map_err(|e| match e {
                AddError::BadUrl(m) => ShardsError::Usage(format!("url: {m}")),
                AddError::Unreachable(m) | AddError::Conflict(m) => ShardsError::Failed(m),
                AddError::Connect(e) => e.into(),
            })?;
            println!("shard {shard} added, with no buckets: move some there (keel shards move, keel shards rebalance)");
            Ok(())
        }
        ShardsCommand::Move { buckets: Buckets(buckets), to } => {
            let mv = moves::start(&db, &buckets, to).await.map_err(|e| match e {
                StartError::Invalid(m) => ShardsError::Usage(m),
                StartError::Conflict(m) => ShardsError::Failed(m),
                StartError::Connect(e) => e.into(),
            })?;
            println!("move {}: {} to shard {to}", mv.id, counted(mv.buckets.len() as i64, "bucket"));
            carry_out(&db, &[mv.id]).await
        }
        ShardsCommand::Cancel { id } => {
            moves::cancel(&db, id).await.map_err(|e| match e {
                CancelError::NotFound(_) => ShardsError::Usage(e.to_string()),
                CancelError::Conflict(m) => ShardsError::Failed(m),
                CancelError::Connect(e) => e.into(),
            })?;
            println!("move {id}: cancelled; undoing it");
            // Undone, the move is recorded failed: what was asked for.
            match carry_out(&db, &[id]).await {
                Err(ShardsError::Failed(_)) if moves::get(&db, id).await?.is_some_and(|m| m.cancelled) => {
                    println!("move {id} undone: its buckets stay where they were");
                    Ok(())
                }
                other => other,
            }
        }
        ShardsCommand::Rebalance { dry_run } => {
            let done = rebalance::rebalance(&db, dry_run).await.map_err(|e| match e {
                RebalanceError::Connect(e) => e.into(),
                other => ShardsError::Failed(other.to_string()),
            })?;
            for mv in &done.moves {
                let id = mv.id.map(|id| format!("move {id}: ")).unwrap_or_default();
                let (buckets, users) = (counted(mv.buckets.len() as i64, "bucket"), counted(mv.users, "user"));
                println!("{id}{buckets} ({users}) to shard {}: {}", mv.to, ranges(&mv.buckets));
            }
            println!("{:<6} {:>12} {:>12}", "SHARD", "USERS NOW", "USERS AFTER");
            for (shard, before) in &done.users_per_shard_before {
                let after = done.users_per_shard_after.get(shard).copied().unwrap_or_default();
                println!("{shard:<6} {before:>12} {after:>12}");
            }
            let ids: Vec<Uuid> = done.moves.iter().filter_map(|m| m.id).collect();
            if done.moves.is_empty() {
                println!("balanced: nothing to move");
            } else if dry_run {
                println!("a dry run: nothing moved");
            }
            if ids.is_empty() {
                return Ok(());
            }
            carry_out(&db, &ids).await
        }
    }
}

async fn print_status(db: &Databases) -> Result<(), ShardsError> {
    let status = admin_shards::status(db).await?;
    println!("shard map version {}", status.version);
    println!("{:<6} {:>7} {:>9} {:<4} RANGES", "SHARD", "BUCKETS", "USERS", "UP");
    for shard in &status.shards {
        let users = shard.users.map_or("?".to_owned(), |n| n.to_string());
        let up = if shard.up { "yes" } else { "no" };
        println!("{:<6} {:>7} {users:>9} {up:<4} {}", shard.shard, shard.buckets.len(), ranges(&shard.buckets));
    }
    let unfinished: Vec<&Move> = status.moves.iter().filter(|m| !finished(m.state)).collect();
    if unfinished.is_empty() {
        println!("no move in progress");
    }
    for mv in unfinished {
        let error = mv.error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default();
        println!(
            "move {}: {} to shard {}, {}, {}/{} rows{error}",
            mv.id,
            counted(mv.buckets.len() as i64, "bucket"),
            mv.to,
            mv.state,
            mv.rows_copied,
            mv.rows_total
        );
    }
    Ok(())
}

/// `1 bucket`, `2 buckets`.
fn counted(n: i64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn finished(state: MoveState) -> bool {
    matches!(state, MoveState::Done | MoveState::Failed)
}

/// Sorted bucket numbers, short: runs of consecutive ones as `a-b`, runs of three or more a step
/// apart as `a-b/step` (a new deployment puts every n-th bucket on a shard), the rest one by one.
fn ranges(buckets: &[u16]) -> String {
    if buckets.is_empty() {
        return "-".to_owned();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < buckets.len() {
        let mut end = i;
        if let Some(step) = buckets.get(i + 1).map(|next| next - buckets[i]) {
            end = i + 1;
            while buckets.get(end + 1).is_some_and(|next| next - buckets[end] == step) {
                end += 1;
            }
            // Two numbers a step apart read better as two numbers.
            if step > 1 && end - i < 2 {
                end = i;
            }
            let (from, to) = (buckets[i], buckets[end]);
            match step {
                _ if end == i => {}
                1 => parts.push(format!("{from}-{to}")),
                step => parts.push(format!("{from}-{to}/{step}")),
            }
        }
        if end == i {
            parts.push(buckets[i].to_string());
        }
        i = end + 1;
    }
    parts.join(",")
}

/// How often the progress of the moves is looked at.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Carries out the moves `ids` in this process, showing their progress on stderr, until each is
/// done or failed (or the command is interrupted: they then go on in any worker).
///
/// The mover here is the workers' own ([`moves::drive`]): it takes the movers' advisory lock first,
/// so with a `keel worker` (or `keel up`) running, one of the two carries the moves out and the
/// other waits for the lock, and either picks up where the other left off. It moves every
/// unfinished move, not only these.
async fn carry_out(db: &Arc<Databases>, ids: &[Uuid]) -> Result<(), ShardsError> {
    // Shards added meanwhile by another process are known here too.
    shard_map::follow(db);
    let stop = Stop::new();
    let mover = tokio::spawn(moves::drive(db.clone(), stop.watch()));
    let outcome = tokio::select! {
        finished = watch_moves(db, ids) => finished,
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            eprintln!("keel: interrupted; finishing the step under way");
            Err(ShardsError::Failed(
                "interrupted: the moves go on in any keel worker (keel shards status shows them)".into(),
            ))
        }
    };
    stop.trigger();
    let _ = mover.await;
    outcome
}

/// Shows the moves' progress until each is done or failed: on a terminal a bar per move, redrawn in
/// place; otherwise (a log, a pipe) a line per change of state.
async fn watch_moves(db: &Databases, ids: &[Uuid]) -> Result<(), ShardsError> {
    let tty = std::io::stderr().is_terminal();
    // The bars on the terminal now, redrawn only when one changes.
    let mut drawn: Vec<String> = Vec::new();
    let mut seen: HashMap<Uuid, (MoveState, Option<String>)> = HashMap::new();
    let mut latest: Vec<Move> = Vec::new();
    loop {
        let mut now = Vec::with_capacity(ids.len());
        for id in ids {
            match moves::get(db, *id).await {
                Ok(Some(mv)) => now.push(mv),
                Ok(None) => return Err(ShardsError::Failed(format!("move {id} is gone from the catalogue"))),
                // The catalogue did not answer this time: the mover meets the same and retries.
                Err(_) => break,
            }
        }
        if now.len() == ids.len() {
            latest = now;
        }
        let mut stderr = std::io::stderr().lock();
        if tty {
            let bars: Vec<String> = latest.iter().map(bar_line).collect();
            if bars != drawn {
                // Back to the first bar drawn (cursor up), then each line cleared and drawn again.
                if !drawn.is_empty() {
                    let _ = write!(stderr, "\x1b[{}A", drawn.len());
                }
                for bar in &bars {
                    let _ = writeln!(stderr, "\r\x1b[2K{bar}");
                }
                drawn = bars;
            }
        } else {
            for mv in &latest {
                let now = (mv.state, mv.error.clone());
                if seen.get(&mv.id) != Some(&now) {
                    let error = mv.error.as_deref().map(|e| format!(" (retrying: {e})")).unwrap_or_default();
                    let _ = writeln!(
                        stderr,
                        "move {} to shard {}: {}, {}/{} rows{error}",
                        mv.id, mv.to, mv.state, mv.rows_copied, mv.rows_total
                    );
                    seen.insert(mv.id, now);
                }
            }
        }
        let _ = stderr.flush();
        drop(stderr);
        if latest.len() == ids.len() && latest.iter().all(|m| finished(m.state)) {
            break;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
    let failed: Vec<String> = latest
        .iter()
        .filter(|m| m.state == MoveState::Failed)
        .map(|m| format!("move {} failed: {}", m.id, m.error.as_deref().unwrap_or("no reason recorded")))
        .collect();
    for mv in latest.iter().filter(|m| m.state == MoveState::Done) {
        let pause = mv.pause_ms.map(|ms| format!(", writes to them paused {ms:.0} ms")).unwrap_or_default();
        println!(
            "move {} done: {}, {} rows to shard {}{pause}",
            mv.id,
            counted(mv.buckets.len() as i64, "bucket"),
            mv.rows_copied,
            mv.to
        );
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ShardsError::Failed(failed.join("; ")))
    }
}

/// One move's progress on a line: `shard 2 <- 171 buckets [######------] 120/270 rows  copying`.
fn bar_line(mv: &Move) -> String {
    Bar { to: mv.to, buckets: mv.buckets.len(), state: mv.state, rows: (mv.rows_copied, mv.rows_total) }
        .line(mv.error.as_deref())
}

/// What a progress bar shows of a move.
struct Bar {
    to: u16,
    buckets: usize,
    state: MoveState,
    /// Copied, of all.
    rows: (i64, i64),
}

impl Bar {
    fn line(&self, error: Option<&str>) -> String {
        const WIDTH: usize = 24;
        let (copied, total) = self.rows;
        let fraction = match (self.state, total) {
            (MoveState::Done, _) => 1.0,
            (_, 0) => 0.0,
            (_, total) => (copied as f64 / total as f64).clamp(0.0, 1.0),
        };
        let filled = (fraction * WIDTH as f64).round() as usize;
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
        let error = match error {
            Some(e) if !finished(self.state) => format!("  retrying: {}", e.chars().take(60).collect::<String>()),
            _ => String::new(),
        };
        let buckets = counted(self.buckets as i64, "bucket");
        format!("shard {} <- {buckets} [{bar}] {copied}/{total} rows  {}{error}", self.to, self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lists_take_numbers_ranges_and_steps() {
        assert_eq!(parse_buckets("1,2,5-9"), Ok(Buckets(vec![1, 2, 5, 6, 7, 8, 9])));
        assert_eq!(parse_buckets("9, 1-3,2"), Ok(Buckets(vec![1, 2, 3, 9])));
        assert_eq!(parse_buckets("0-8/4"), Ok(Buckets(vec![0, 4, 8])));
        assert_eq!(parse_buckets("1023"), Ok(Buckets(vec![1023])));
        for bad in ["", "1024", "5-2", "x", "1-2/0", "3/2", "-1"] {
            assert!(parse_buckets(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn bucket_ranges_are_shown_short_and_read_back_the_same() {
        let even: Vec<u16> = (0..1024).step_by(2).collect();
        assert_eq!(ranges(&even), "0-1022/2");
        assert_eq!(ranges(&(0..512).collect::<Vec<u16>>()), "0-511");
        assert_eq!(ranges(&[1, 3, 4, 5, 9, 11]), "1,3-5,9,11");
        assert_eq!(ranges(&[0, 2, 4, 5, 6, 7]), "0-4/2,5-7");
        assert_eq!(ranges(&[]), "-");
        assert_eq!(ranges(&[3, 4]), "3-4");
        assert_eq!(ranges(&[3, 5]), "3,5");
        for buckets in [even, vec![1, 3, 4, 5, 9, 11], vec![0, 2, 4, 5, 6, 7], vec![7]] {
            assert_eq!(parse_buckets(&ranges(&buckets)), Ok(Buckets(buckets)));
        }
    }

    #[test]
    fn a_moves_progress_is_a_bar_of_its_rows() {
        let mut bar = Bar { to: 2, buckets: 3, state: MoveState::Copying, rows: (50, 200) };
        assert_eq!(bar.line(None), "shard 2 <- 3 buckets [######------------------] 50/200 rows  copying");
        assert!(bar.line(Some("the slot is still in use")).ends_with("copying  retrying: the slot is still in use"));
        bar.state = MoveState::Done;
        assert!(bar.line(Some("an old error")).ends_with("[########################] 50/200 rows  done"));
        bar.rows = (0, 0);
        bar.state = MoveState::Copying;
        assert!(bar.line(None).contains("[------------------------] 0/0"));
    }
}
