//! The on-disk kernel cache: one file per compiled variant, written atomically, never trusted.
//!
//! Location: `FLASHATTN_CACHE_DIR` (the value `off` disables the disk cache), else
//! `$XDG_CACHE_HOME/flashattn`, else `~/.cache/flashattn`. A file is `<key:016x>.cubin`:
//!
//! ```text
//! magic "FACUBIN1" | key u64 | cubin_len u64 | log_len u64 | checksum u64 | cubin | log
//! ```
//! (little-endian; checksum = FNV-1a 64 over key, lengths, cubin and log). A file with a wrong
//! magic, key, length or checksum is treated as a miss and overwritten by a fresh compile.
//! Writes go to a unique temporary file in the same directory, then `rename` (atomic on POSIX),
//! so concurrent writers and readers never see half a file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"FACUBIN1";
const HEADER: usize = 8 + 8 * 4;

/// 64-bit FNV-1a, the hash of cache keys and checksums (stable across builds and platforms).
#[derive(Clone, Copy, Debug)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn bytes(mut self, data: &[u8]) -> Self {
        for &b in data {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A length-prefixed string, so that ("ab","c") and ("a","bc") hash differently.
    pub fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    pub fn u64(self, x: u64) -> Self {
        self.bytes(&x.to_le_bytes())
    }
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// A cache entry read back from disk.
pub struct Entry {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Result of looking a key up on disk.
pub enum Lookup {
    Hit(Entry),
    Miss,
    /// A file existed but failed validation (it will be overwritten).
    Corrupt,
}

/// The kernel cache directory.
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// A cache in `dir` (created on first store).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        DiskCache { dir: dir.into() }
    }

    /// The cache at the configured location, or `None` when disabled / no home directory.
    pub fn default_location() -> Option<Self> {
        default_dir().map(DiskCache::at)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the file for `key`.
    pub fn path(&self, key: u64) -> PathBuf {
        self.dir.join(format!("{key:016x}.cubin"))
    }

    /// Number of cache files present.
    pub fn entries(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "cubin"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Reads and validates the entry for `key`.
    pub fn load(&self, key: u64) -> Lookup {
        match std::fs::read(self.path(key)) {
            Ok(data) => decode(key, &data).map_or(Lookup::Corrupt, Lookup::Hit),
            Err(_) => Lookup::Miss,
        }
    }

    /// Writes the entry for `key` atomically (temporary file + rename).
    pub fn store(&self, key: u64, cubin: &[u8], log: &str) -> std::io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".{key:016x}.{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode(key, cubin, log))?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path(key))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn default_dir() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("FLASHATTN_CACHE_DIR").filter(|v| !v.is_empty()) {
        if v == "off" || v == "0" || v == "none" {
            return None;
        }
        return Some(PathBuf::from(v));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("flashattn"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/flashattn"))
}

fn checksum(key: u64, cubin: &[u8], log: &[u8]) -> u64 {
    Fnv64::new()
        .u64(key)
        .u64(cubin.len() as u64)
        .u64(log.len() as u64)
        .bytes(cubin)
        .bytes(log)
        .finish()
}

fn encode(key: u64, cubin: &[u8], log: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + cubin.len() + log.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&key.to_le_bytes());
    v.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    v.extend_from_slice(&(log.len() as u64).to_le_bytes());
    v.extend_from_slice(&checksum(key, cubin, log.as_bytes()).to_le_bytes());
    v.extend_from_slice(cubin);
    v.extend_from_slice(log.as_bytes());
    v
}

fn decode(key: u64, data: &[u8]) -> Option<Entry> {
    if data.len() < HEADER || &data[..8] != MAGIC {
        return None;
    }
    let word =
        |i: usize| u64::from_le_bytes(data[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]));
    let (k, clen, llen, sum) = (word(0), word(1) as usize, word(2) as usize, word(3));
    if k != key || clen == 0 || HEADER.checked_add(clen)?.checked_add(llen)? != data.len() {
        return None;
    }
    let cubin = &data[HEADER..HEADER + clen];
    let log = &data[HEADER + clen..];
    if checksum(key, cubin, log) != sum {
        return None;
    }
    Some(Entry {
        cubin: cubin.to_vec(),
        log: String::from_utf8(log.to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("fa-cache-unit-{}", std::process::id()));
        let c = DiskCache::at(&dir);
        assert!(matches!(c.load(7), Lookup::Miss));
        c.store(7, b"\x7fELFabc", "log").unwrap();
        match c.load(7) {
            Lookup::Hit(e) => assert_eq!(
                (e.cubin.as_slice(), e.log.as_str()),
                (&b"\x7fELFabc"[..], "log")
            ),
            _ => panic!("expected hit"),
        }
        let mut bytes = std::fs::read(c.path(7)).unwrap();
        let n = bytes.len();
        bytes[n - 5] ^= 1;
        std::fs::write(c.path(7), &bytes).unwrap();
        assert!(matches!(c.load(7), Lookup::Corrupt));
        std::fs::write(c.path(7), &bytes[..10]).unwrap();
        assert!(matches!(c.load(7), Lookup::Corrupt));
        assert_eq!(c.entries(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
