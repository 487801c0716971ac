//! Retention: which segments are released and when released segments are deleted.
//!
//! A segment is released when every record in it is below the ledger's release point (the
//! minimum of all cursors and in-flight batch starts); it is wholly below when the next segment
//! starts at or before the release point, so the active segment is never released. Released
//! segments are deleted oldest first while any [`crate::Retention`] limit is exceeded or the disk
//! budget is full. With no cursors at all nothing is released.

use crate::error::WalError;
use crate::types::{Lsn, SegmentId};
use crate::wal::Inner;
use std::time::SystemTime;

impl Inner {
    /// Deletes released segments past the retention limits; updates the budget watch.
    pub(crate) fn apply_retention(&self) -> Result<(), WalError> {
        let mut s = self.lock_segs();
        let Some(release) = s.release_point else {
            return Ok(());
        };
        let ids: Vec<SegmentId> = s.list.keys().copied().collect();
        // Released: all but the last, while the next segment starts at or before the point.
        let released = ids.windows(2).take_while(|w| w[1].0 <= release.0).count();
        if released > 0 {
            s.released_through = s.released_through.max(Lsn(ids[released].0 - 1));
        }
        let r = self.opts.retention;
        let now = SystemTime::now();
        let mut released_bytes: u64 = ids[..released]
            .iter()
            .filter_map(|id| s.list.get(id))
            .map(|m| m.len)
            .sum();
        let mut released_left = released;
        let mut removed = false;
        let mut result = Ok(());
        for id in &ids[..released] {
            let Some(meta) = s.list.get(id).copied() else {
                continue;
            };
            let old = meta
                .sealed_at
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() > r.age_max);
            let over = released_left > r.segments_max as usize
                || released_bytes > r.bytes_max
                || old
                || s.bytes_on_disk >= self.opts.budget_bytes_max;
            if !over {
                break;
            }
            let path = self.segment_path(*id);
            match self.fs.remove(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    result = Err(WalError::io("remove segment", path, e));
                    break;
                }
            }
            tracing::debug!(segment = %id, bytes = meta.len, "deleted released segment");
            s.list.remove(id);
            s.bytes_on_disk -= meta.len;
            released_bytes -= meta.len;
            released_left -= 1;
            removed = true;
        }
        if removed {
            let bytes = s.bytes_on_disk;
            drop(s);
            self.fs
                .sync_dir(&self.dir)
                .map_err(|e| WalError::io("fsync directory", &self.dir, e))?;
            self.disk_tx.send_replace(bytes);
        }
        result
    }
}
