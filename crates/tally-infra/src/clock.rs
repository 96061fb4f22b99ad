//! Wall-clock time in Unix milliseconds, the unit every window stamp uses.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the system clock should be after the Unix epoch");
    since_epoch.as_millis() as i64
}
