//! Write-back: changes are made to values in memory and written to the source in batches, at most
//! one interval later and once more when stopped. The price is declared: a process killed without
//! warning loses what changed since its last flush — at most [`WriteBack::loss_window`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

pub struct WriteBack<K, V> {
    kind: &'static str,
    interval: Duration,
    state: Mutex<State<K, V>>,
}

struct State<K, V> {
    values: HashMap<K, V>,
    /// Keys changed since the last flush that succeeded.
    dirty: HashSet<K>,
}

impl<K, V> WriteBack<K, V>
where
    K: Hash + Eq + Clone + Send,
    V: Clone + Default + Send,
{
    /// Values of `kind` (a metrics label), flushed every `interval`.
    pub fn new(kind: &'static str, interval: Duration) -> WriteBack<K, V> {
        WriteBack { kind, interval, state: Mutex::new(State { values: HashMap::new(), dirty: HashSet::new() }) }
    }

    /// How much a crash can lose: the changes of one interval.
    pub fn loss_window(&self) -> Duration {
        self.interval
    }

    /// Changes a value in memory (a default one if the key is new); it is written at the next flush.
    pub fn update(&self, key: K, change: impl FnOnce(&mut V)) {
        let mut state = self.state.lock().unwrap();
        change(state.values.entry(key.clone()).or_default());
        state.dirty.insert(key);
    }

    /// Reads a value in memory, flushed or not.
    pub fn read<R>(&self, key: &K, read: impl FnOnce(Option<&V>) -> R) -> R {
        read(self.state.lock().unwrap().values.get(key))
    }

    /// Writes the values changed since the last flush with `write` (which must be idempotent: after
    /// a failure they are written again at the next flush, along with later changes).
    pub async fn flush<W, Fut, E>(&self, write: W) -> Result<usize, E>
    where
        W: FnOnce(Vec<(K, V)>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let batch: Vec<(K, V)> = {
            let mut state = self.state.lock().unwrap();
            let dirty: Vec<K> = state.dirty.drain().collect();
            dirty.into_iter().map(|k| (k.clone(), state.values[&k].clone())).collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let keys: Vec<K> = batch.iter().map(|(k, _)| k.clone()).collect();
        if let Err(e) = write(batch).await {
            // Still in memory: the next flush writes them.
            self.state.lock().unwrap().dirty.extend(keys);
            metrics::counter!("keel_write_back_failures_total", "kind" => self.kind).increment(1);
            return Err(e);
        }
        metrics::counter!("keel_write_back_flushes_total", "kind" => self.kind).increment(1);
        Ok(keys.len())
    }

    /// Flushes every interval until `stop` completes, then once more (a graceful stop loses nothing
    /// that the last flush can write).
    pub async fn run<W, Fut, E>(&self, write: W, stop: impl Future<Output = ()> + Send)
    where
        W: Fn(Vec<(K, V)>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = &mut stop => break,
            }
            if let Err(e) = self.flush(&write).await {
                tracing::warn!(kind = self.kind, error = %e, "could not write back; keeping the changes in memory");
            }
        }
        match self.flush(&write).await {
            Ok(n) => tracing::info!(kind = self.kind, keys = n, "written back at shutdown"),
            Err(e) => {
                tracing::error!(kind = self.kind, error = %e, "could not write back at shutdown; those changes are lost")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn changes_are_written_in_batches_and_again_after_a_failure() {
        let buffer: WriteBack<&str, u64> = WriteBack::new("test", Duration::from_secs(1));
        buffer.update("a", |v| *v += 1);
        buffer.update("a", |v| *v += 1);
        buffer.update("b", |v| *v += 5);
        let failed = buffer.flush(|_| async { Err::<(), _>("source down") }).await;
        assert!(failed.is_err());
        buffer.update("b", |v| *v += 1);
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = written.clone();
        let flushed = buffer
            .flush(|batch| async move {
                sink.lock().unwrap().extend(batch);
                Ok::<(), ()>(())
            })
            .await;
        assert_eq!(flushed, Ok(2));
        let mut written = written.lock().unwrap().clone();
        written.sort();
        assert_eq!(written, [("a", 2), ("b", 6)], "the failed batch was kept, with later changes");
        assert_eq!(buffer.flush(|_| async { Ok::<(), ()>(()) }).await, Ok(0), "nothing changed since");
        assert_eq!(buffer.read(&"b", |v| v.copied()), Some(6));
    }

    #[tokio::test(start_paused = true)]
    async fn run_flushes_every_interval_and_at_stop() {
        let buffer: Arc<WriteBack<u32, u32>> = Arc::new(WriteBack::new("test", Duration::from_secs(1)));
        let batches = Arc::new(Mutex::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runner = {
            let (buffer, batches) = (buffer.clone(), batches.clone());
            tokio::spawn(async move {
                let write = |_: Vec<(u32, u32)>| {
                    *batches.lock().unwrap() += 1;
                    async { Ok::<(), String>(()) }
                };
                buffer.run(write, async { stop_rx.await.unwrap() }).await
            })
        };
        buffer.update(1, |v| *v += 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(*batches.lock().unwrap(), 1, "flushed within the interval");
        buffer.update(2, |v| *v += 1);
        stop_tx.send(()).unwrap();
        runner.await.unwrap();
        assert_eq!(*batches.lock().unwrap(), 2, "flushed at stop");
    }
}
