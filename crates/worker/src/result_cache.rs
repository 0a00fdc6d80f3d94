//! The result cache: encoded query results on disk, shared by every worker of the pool and kept
//! across restarts.
//!
//! An entry is one file, `<key>.entry`, named by the SHA-256 of everything its bytes depend on
//! (the statement's exact text, its parameters, the format, the row limit and the version of
//! every dataset the statement reads; see [`CacheKey`]). The key changes when any of those datasets
//! changes, so an entry can never be served for data it was not computed from; entries of old
//! versions are simply never asked for again and age out.
//!
//! Each worker also keeps the entries it served last in memory (a small LRU bounded in bytes), so
//! a hot result is answered without a file read or a trip to the blocking pool. A result that
//! was quick to compute is kept there only ([`ResultCache::put_hot`]): computing it again costs
//! less than a file's store and read (the request handler decides which).
//!
//! Writes are atomic: the entry is written to a temporary file and renamed into place. The byte
//! bound holds at all times: under the directory's lock (`flock` on `lock`), a store first makes
//! room, evicting the least recently used entries (by modification time, which a hit refreshes),
//! then adds its size to the pool's byte counter before its file appears. The counter is only a
//! cheap upper bound; whenever it says the bound would be crossed, the directory is counted for
//! real and entries are evicted down to 90 % of the bound.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hashlink::LruCache;
use sha2::{Digest, Sha256};

use ferrocorn_scoreboard::PoolCounters;

use crate::settings::ResultCacheSettings;

/// The identity of a result: the hex SHA-256 of its inputs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// Hash the parts that determine a result's bytes. Each part is length-prefixed, so no two
    /// different lists of parts hash the same input.
    pub fn new<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut hasher = Sha256::new();
        // v2: keyed on the exact statement text (v1 keyed on a normalisation of it).
        hasher.update(b"ferrocorn-result-v2");
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let digest = hasher.finalize();
        let mut hex = String::with_capacity(2 * digest.len());
        for byte in digest.iter() {
            hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
            hex.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A cached result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rows: u64,
    pub truncated: bool,
    pub body: Bytes,
}

/// A temporary file older than this belongs to no store in progress.
const STALE_TEMP: Duration = Duration::from_secs(60);

/// Entries touched within this long are not touched again on a hit (saves a write per hit).
const TOUCH_AFTER: Duration = Duration::from_secs(10);

/// Bytes of entries one worker keeps in memory.
const HOT_BYTES: usize = 16 << 20;
/// The largest entry kept in memory.
const HOT_ENTRY_BYTES: usize = 1 << 20;

/// The pool's result cache.
pub struct ResultCache {
    dir: PathBuf,
    max_bytes: u64,
    counters: &'static PoolCounters,
    temp_names: AtomicU64,
    hot: Mutex<Hot>,
}

impl std::fmt::Debug for ResultCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// This worker's most recently used entries.
struct Hot {
    entries: LruCache<CacheKey, Entry>,
    bytes: usize,
}

impl Hot {
    fn insert(&mut self, key: &CacheKey, entry: &Entry) {
        let size = entry.body.len();
        if size > HOT_ENTRY_BYTES {
            return;
        }
        if let Some(old) = self.entries.insert(key.clone(), entry.clone()) {
            self.bytes -= old.body.len();
        }
        self.bytes += size;
        while self.bytes > HOT_BYTES {
            match self.entries.remove_lru() {
                Some((_, old)) => self.bytes -= old.body.len(),
                None => break,
            }
        }
    }
}

impl ResultCache {
    /// Use (and create) the cache directory.
    pub fn open(
        settings: &ResultCacheSettings,
        counters: &'static PoolCounters,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&settings.dir)?;
        Ok(Self {
            dir: settings.dir.clone(),
            max_bytes: settings.max_bytes,
            counters,
            temp_names: AtomicU64::new(0),
            hot: Mutex::new(Hot {
                entries: LruCache::new_unbounded(),
                bytes: 0,
            }),
        })
    }

    /// The largest entry stored: an eighth of the bound, so one entry never evicts most others.
    pub fn max_entry_bytes(&self) -> u64 {
        self.max_bytes / 8
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.entry", key.as_str()))
    }

    fn hot(&self) -> std::sync::MutexGuard<'_, Hot> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry for `key` if this worker holds it in memory (counted as a hit); never blocks
    /// on the file system.
    pub fn get_hot(&self, key: &CacheKey) -> Option<Entry> {
        let found = self.hot().entries.get(key).cloned();
        if found.is_some() {
            PoolCounters::add(&self.counters.cache_hits, 1);
        }
        found
    }

    /// The entry for `key` from memory or disk, counted as a hit or a miss (the tests' way in;
    /// requests ask memory first and read the file on the blocking pool).
    #[cfg(test)]
    fn get(&self, key: &CacheKey) -> Option<Entry> {
        self.get_hot(key).or_else(|| self.load(key))
    }

    /// The entry for `key` from disk (kept in memory from then on), counted as a hit or a miss.
    /// Reads a file: call it where blocking is allowed, after [`Self::get_hot`] found nothing.
    pub fn load(&self, key: &CacheKey) -> Option<Entry> {
        let found = self.read(key);
        if let Some(entry) = &found {
            self.hot().insert(key, entry);
        }
        let counter = if found.is_some() {
            &self.counters.cache_hits
        } else {
            &self.counters.cache_misses
        };
        PoolCounters::add(counter, 1);
        found
    }

    fn read(&self, key: &CacheKey) -> Option<Entry> {
        let mut file = File::open(self.path(key)).ok()?;
        let meta = file.metadata().ok()?;
        let modified = meta.modified().ok()?;
        let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut data).ok()?;
        let entry = decode(&data)?;
        if SystemTime::now()
            .duration_since(modified)
            .is_ok_and(|age| age > TOUCH_AFTER)
        {
            let _ = file.set_modified(SystemTime::now());
        }
        Some(entry)
    }

    /// Store an entry (unless it is larger than [`Self::max_entry_bytes`]). Failures are logged
    /// and otherwise ignored: the cache is an optimisation.
    pub fn put(&self, key: &CacheKey, entry: &Entry) {
        let data = encode(entry);
        let size = data.len() as u64;
        if size > self.max_entry_bytes() {
            return;
        }
        self.hot().insert(key, entry);
        if let Err(e) = self.store(key, &data) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "cannot store a result cache entry");
        }
    }

    /// Keep an entry in this worker's memory only: for a result cheaper to compute again than
    /// to store and read back from disk. Never blocks.
    pub fn put_hot(&self, key: &CacheKey, entry: &Entry) {
        self.hot().insert(key, entry);
        PoolCounters::add(&self.counters.cache_stores, 1);
    }

    /// Count a miss that did not look on disk (the statement's results live in memory only).
    pub fn note_miss(&self) {
        PoolCounters::add(&self.counters.cache_misses, 1);
    }

    fn store(&self, key: &CacheKey, data: &[u8]) -> std::io::Result<()> {
        let temp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.temp_names.fetch_add(1, Ordering::Relaxed)
        ));
        let stored = File::create(&temp)
            .and_then(|mut f| f.write_all(data))
            .and_then(|()| self.publish(&temp, key, data.len() as u64));
        if stored.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        stored
    }

    /// Make room for `size` bytes and rename the written `temp` into place, under the lock.
    fn publish(&self, temp: &Path, key: &CacheKey, size: u64) -> std::io::Result<()> {
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))?;
        lock.lock()?;
        let bytes = &self.counters.cache_bytes;
        if self.counters.cache_bytes_known.load(Ordering::Acquire) == 0
            || bytes.load(Ordering::Acquire) + size > self.max_bytes
        {
            let kept = self.evict(
                self.max_bytes
                    .saturating_sub(size)
                    .min(self.max_bytes / 10 * 9),
            );
            bytes.store(kept, Ordering::Release);
            self.counters.cache_bytes_known.store(1, Ordering::Release);
        }
        // Counted before the file appears: the counter is never below what is on disk.
        bytes.fetch_add(size, Ordering::AcqRel);
        let renamed = std::fs::rename(temp, self.path(key));
        match renamed {
            Ok(()) => PoolCounters::add(&self.counters.cache_stores, 1),
            Err(_) => {
                bytes.fetch_sub(size, Ordering::AcqRel);
            }
        }
        renamed
    }

    /// Count the entries and remove the least recently used until at most `target` bytes remain;
    /// returns the bytes kept. Called with the lock held.
    fn evict(&self, target: u64) -> u64 {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            let Some((modified, len)) = entry
                .metadata()
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
            else {
                continue;
            };
            if path.extension().is_some_and(|x| x == "entry") {
                entries.push((modified, len, path));
            } else if entry.file_name().to_string_lossy().starts_with(".tmp-")
                && now
                    .duration_since(modified)
                    .is_ok_and(|age| age > STALE_TEMP)
            {
                // Left by a worker that died between writing and publishing.
                let _ = std::fs::remove_file(&path);
            }
        }
        let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
        if total <= target {
            return total;
        }
        entries.sort();
        for (_, len, path) in entries {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                PoolCounters::add(&self.counters.cache_evictions, 1);
            }
        }
        total
    }

    #[cfg(test)]
    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An entry file: a 17-byte header (rows, truncated flag, body length... as little-endian
/// integers) and the body.
fn encode(entry: &Entry) -> Vec<u8> {
    let mut data = Vec::with_capacity(17 + entry.body.len());
    data.extend_from_slice(&entry.rows.to_le_bytes());
    data.push(u8::from(entry.truncated));
    data.extend_from_slice(&(entry.body.len() as u64).to_le_bytes());
    data.extend_from_slice(&entry.body);
    data
}

fn decode(data: &[u8]) -> Option<Entry> {
    let rows = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let truncated = *data.get(8)? != 0;
    let len = u64::from_le_bytes(data.get(9..17)?.try_into().ok()?);
    let body = data.get(17..)?;
    (body.len() as u64 == len).then(|| Entry {
        rows,
        truncated,
        body: Bytes::copy_from_slice(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> &'static PoolCounters {
        Box::leak(Box::default())
    }

    fn entry(size: usize, rows: u64) -> Entry {
        Entry {
            rows,
            truncated: false,
            body: Bytes::from(vec![b'x'; size]),
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "entry"))
            .map(|e| e.metadata().expect("meta").len())
            .sum()
    }

    #[test]
    fn keys_separate_their_parts() {
        let a = CacheKey::new([b"ab".as_slice(), b"c"]);
        let b = CacheKey::new([b"a".as_slice(), b"bc"]);
        assert_ne!(a, b);
        assert_eq!(a, CacheKey::new([b"ab".as_slice(), b"c"]));
        assert_eq!(a.as_str().len(), 64);
    }

    #[test]
    fn round_trips_and_counts_hits_and_misses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counters = counters();
        let settings = ResultCacheSettings {
            dir: dir.path().join("results"),
            max_bytes: 1 << 20,
            disk_worthy: Duration::ZERO,
        };
        let cache = ResultCache::open(&settings, counters).expect("open");
        let key = CacheKey::new([b"q".as_slice()]);
        assert_eq!(cache.get(&key), None);
        let stored = Entry {
            rows: 3,
            truncated: true,
            body: Bytes::from_static(b"{\"rows\":[]}"),
        };
        cache.put(&key, &stored);
        assert_eq!(cache.get(&key), Some(stored));
        assert_eq!(PoolCounters::get(&counters.cache_hits), 1);
        assert_eq!(PoolCounters::get(&counters.cache_misses), 1);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(cache.dir())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_damaged_entry_is_a_miss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = ResultCacheSettings {
            dir: dir.path().to_owned(),
            max_bytes: 1 << 20,
            disk_worthy: Duration::ZERO,
        };
        let cache = ResultCache::open(&settings, counters()).expect("open");
        let key = CacheKey::new([b"q".as_slice()]);
        cache.put(&key, &entry(100, 1));
        let path = cache.path(&key);
        let data = std::fs::read(&path).expect("read");
        std::fs::write(&path, &data[..50]).expect("truncate");
        // Another worker (nothing in its memory) reads the damaged file.
        let other = ResultCache::open(&settings, counters()).expect("open");
        assert_eq!(other.get(&key), None);
    }

    #[test]
    fn the_byte_bound_holds_and_the_least_recently_used_go_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counters = counters();
        let settings = ResultCacheSettings {
            dir: dir.path().to_owned(),
            max_bytes: 64 << 10,
            disk_worthy: Duration::ZERO,
        };
        let cache = ResultCache::open(&settings, counters).expect("open");
        let keys: Vec<CacheKey> = (0..200u32)
            .map(|i| CacheKey::new([i.to_le_bytes().as_slice()]))
            .collect();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for (i, key) in keys.iter().enumerate() {
            cache.put(key, &entry(1000 + i * 13, i as u64));
            assert!(disk_bytes(dir.path()) <= settings.max_bytes);
            if i % 10 == 0 {
                // The first entry is read again every ten stores, each time after more than
                // TOUCH_AFTER (simulated by ageing its file): it must survive.
                File::options()
                    .write(true)
                    .open(cache.path(&keys[0]))
                    .and_then(|f| f.set_modified(old))
                    .expect("age the hot entry");
                // Read from disk (as a worker without it in memory would), which touches it.
                assert!(cache.read(&keys[0]).is_some(), "hot entry evicted at {i}");
            }
        }
        assert!(PoolCounters::get(&counters.cache_evictions) > 100);
        assert!(cache.path(&keys[199]).exists());
        assert!(!cache.path(&keys[1]).exists(), "a cold entry was kept");
        assert!(PoolCounters::get(&counters.cache_bytes) >= disk_bytes(dir.path()));
        // Too large for the cache: not stored.
        let big = CacheKey::new([b"big".as_slice()]);
        cache.put(&big, &entry(10 << 10, 1));
        assert!(!cache.path(&big).exists());
        assert!(cache.get(&big).is_none());
    }

    #[test]
    fn memory_holds_recent_entries_within_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counters = counters();
        let settings = ResultCacheSettings {
            dir: dir.path().to_owned(),
            max_bytes: 1 << 30,
            disk_worthy: Duration::ZERO,
        };
        let cache = ResultCache::open(&settings, counters).expect("open");
        let key = CacheKey::new([b"q".as_slice()]);
        cache.put(&key, &entry(100, 1));
        // Served from memory even once the file is gone.
        std::fs::remove_file(cache.path(&key)).expect("remove");
        assert_eq!(cache.get_hot(&key), Some(entry(100, 1)));
        assert_eq!(PoolCounters::get(&counters.cache_hits), 1);
        // 20 entries of 1 MiB do not fit in memory: the oldest go.
        for i in 0..20u32 {
            cache.put(
                &CacheKey::new([i.to_le_bytes().as_slice()]),
                &entry(1 << 20, 1),
            );
        }
        assert!(cache.hot().bytes <= HOT_BYTES);
        assert_eq!(cache.get_hot(&key), None);
        let last = CacheKey::new([19u32.to_le_bytes().as_slice()]);
        assert!(cache.get_hot(&last).is_some());
    }

    #[test]
    fn a_dead_store_s_temporary_file_is_removed_when_the_directory_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = ResultCacheSettings {
            dir: dir.path().to_owned(),
            max_bytes: 1 << 20,
            disk_worthy: Duration::ZERO,
        };
        let stale = dir.path().join(".tmp-1-0");
        let fresh = dir.path().join(".tmp-1-1");
        std::fs::write(&stale, b"half").expect("write");
        std::fs::write(&fresh, b"half").expect("write");
        File::options()
            .write(true)
            .open(&stale)
            .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(3600)))
            .expect("age");
        // The first store of a fresh pool counts the directory.
        let cache = ResultCache::open(&settings, counters()).expect("open");
        cache.put(&CacheKey::new([b"q".as_slice()]), &entry(10, 1));
        assert!(!stale.exists(), "a dead store's file is removed");
        assert!(
            fresh.exists(),
            "a store that may be in progress is left alone"
        );
    }
}
