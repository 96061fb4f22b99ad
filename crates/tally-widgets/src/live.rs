//! Live counters: one watcher per process and counter, shared by every client that follows it.
//!
//! A client of `GET /v1/counters/{name}/events` subscribes to its counter's watch channel. The
//! first subscriber starts the counter's watcher, which reads the counter through the read
//! service (past the cache) every [`INTERVAL`] and publishes the value when it changed; the
//! watcher stops once the last subscriber left. So Redis sees one read per counter per
//! interval, however many clients follow it, and a client costs one channel receiver.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tally_core::CounterName;
use tally_read::ReadService;
use tally_read::service::CounterValue;
use tokio::sync::watch;
use tracing::debug;

static WATCHED_COUNTERS: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "tally_widgets_live_counters",
        "Counters this process watches for live clients: one read per counter per 250 ms"
    )
    .expect("the metric should register once")
});

/// How often a followed counter is read: at most one event per interval per counter.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// The watchers of this process, by counter.
pub struct LiveCounters {
    read: Arc<ReadService>,
    watchers: Mutex<HashMap<CounterName, watch::Sender<Option<CounterValue>>>>,
}

impl LiveCounters {
    pub fn new(read: Arc<ReadService>) -> Self {
        Self {
            read,
            watchers: Mutex::new(HashMap::new()),
        }
    }

    /// Follows a counter: the receiver holds its latest value (None until the first read).
    pub fn follow(self: &Arc<Self>, name: CounterName) -> watch::Receiver<Option<CounterValue>> {
        let mut watchers = self.watchers.lock().expect("no code panics holding it");
        if let Some(sender) = watchers.get(&name) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        watchers.insert(name.clone(), sender.clone());
        WATCHED_COUNTERS.set(watchers.len() as i64);
        tokio::spawn(Arc::clone(self).watch(name, sender));
        receiver
    }

    /// How many counters have a watcher now.
    pub fn watched(&self) -> usize {
        self.watchers
            .lock()
            .expect("no code panics holding it")
            .len()
    }

    async fn watch(
        self: Arc<Self>,
        name: CounterName,
        sender: watch::Sender<Option<CounterValue>>,
    ) {
        let mut ticker = tokio::time::interval(INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            {
                // Leave under the lock, so a new follower either finds this watcher alive or
                // starts a new one.
                let mut watchers = self.watchers.lock().expect("no code panics holding it");
                if sender.receiver_count() == 0 {
                    watchers.remove(&name);
                    WATCHED_COUNTERS.set(watchers.len() as i64);
                    return;
                }
            }
            match self.read.read(vec![name.clone()], true).await {
                Ok(mut values) => {
                    let value = values.pop().expect("one name read gives one value");
                    sender.send_if_modified(|latest| {
                        let changed = latest
                            .as_ref()
                            .is_none_or(|latest| latest.value != value.value);
                        if changed {
                            *latest = Some(value);
                        }
                        changed
                    });
                }
                // The next tick tries again; clients keep the last value they were sent.
                Err(error) => {
                    debug!(%error, counter.name = %name, "a live counter could not be read")
                }
            }
        }
    }
}
