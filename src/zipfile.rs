//! A small ZIP reader and a streaming ZIP writer, for the two container formats built on ZIP that
//! this crate meets: PyTorch checkpoints (`torch.save` since 1.6) and NumPy `.npz` archives.
//!
//! **Why not the `zip` crate.** `torch.save` writes ZIP64 end records after the central directory
//! without setting the 0xFFFF/0xFFFFFFFF markers in the classic end record that announce them. The
//! `zip` crate (9.x, used by candle's pickle loader) then looks for the central directory 76 bytes
//! (the two ZIP64 records) past where it is; whether that lands on a valid header depends on the
//! archive's inner name, so some valid checkpoints fail to open ("Invalid Central Directory
//! header"). This reader takes the ZIP64 locator whenever it is present, which is what Python's
//! `zipfile` and `torch.load` do. The upstream report is `docs/upstream/zip-zip64-end-records.md`.
//!
//! Reading: the central directory is found from the end records ([`ZipReader::open`]); entries
//! are stored (method 0) or deflated (method 8, via `flate2`); a stored entry can be read as a
//! stream from any offset without loading it ([`ZipReader::stored_reader`]).
//!
//! Writing ([`StoredZipWriter`]): stored entries whose size is known up front, streamed from the
//! caller with a running CRC-32, ZIP64 records only where sizes or offsets need them, into a
//! temporary file that is renamed over the target when [`StoredZipWriter::finish`] succeeds.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Errors of ZIP reading and writing.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a ZIP archive, or its records are damaged.
    #[error("{path}: not a valid ZIP archive: {reason}")]
    Bad { path: PathBuf, reason: String },
    /// A named entry is absent.
    #[error("{path}: no entry `{name}` in the archive")]
    Missing { path: PathBuf, name: String },
    /// The writer was used out of order (a wrong byte count, an entry left open).
    #[error("{path}: {reason}")]
    Usage { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, ZipError>;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
const END64_SIG: u32 = 0x0606_4b50;
const LOCATOR64_SIG: u32 = 0x0706_4b50;
/// Compression methods this reader understands.
const STORED: u16 = 0;
const DEFLATED: u16 = 8;

/// One file inside an archive, as its central directory describes it.
#[derive(Debug, Clone)]
pub struct ZipEntry {
    pub name: String,
    /// 0 stored, 8 deflated.
    pub method: u16,
    pub compressed_size: u64,
    pub size: u64,
    pub crc32: u32,
    local_header_offset: u64,
}

/// An open archive: its entries, read from the central directory.
pub struct ZipReader {
    path: PathBuf,
    file: BufReader<File>,
    len: u64,
    entries: Vec<ZipEntry>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes: callers check the length"))
}

impl ZipReader {
    /// Opens `path` and reads its central directory.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ZipError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut reader = ZipReader { path: path.to_path_buf(), file: BufReader::new(file), len, entries: Vec::new() };
        reader.entries = reader.read_directory()?;
        Ok(reader)
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry, in central-directory order.
    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn entry(&self, name: &str) -> Result<&ZipEntry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ZipError::Missing { path: self.path.clone(), name: name.to_string() })
    }

    fn bad(&self, reason: impl Into<String>) -> ZipError {
        ZipError::Bad { path: self.path.clone(), reason: reason.into() }
    }

    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(
                self.bad(format!("a record at byte {offset} runs past the end of the file ({} bytes)", self.len))
            );
        }
        let mut buf = vec![0u8; len];
        let path = self.path.clone();
        let io = |source| ZipError::Io { path, source };
        self.file.seek(SeekFrom::Start(offset)).and_then(|_| self.file.read_exact(&mut buf)).map_err(io)?;
        Ok(buf)
    }

    /// Finds the end records and parses the central directory.
    fn read_directory(&mut self) -> Result<Vec<ZipEntry>> {
        // The classic end record is 22 bytes plus a comment of at most 65535 bytes.
        let tail_len = self.len.min(22 + 65535) as usize;
        if tail_len < 22 {
            return Err(self.bad(format!("{} bytes is too short for a ZIP archive", self.len)));
        }
        let tail_start = self.len - tail_len as u64;
        let tail = self.read_at(tail_start, tail_len)?;
        let end_at = (0..=tail_len - 22)
            .rev()
            .find(|&i| u32_at(&tail, i) == END_SIG && i + 22 + u16_at(&tail, i + 20) as usize == tail_len)
            .ok_or_else(|| self.bad("no end-of-central-directory record"))?;
        let end = &tail[end_at..];
        let mut count = u16_at(end, 10) as u64;
        let mut dir_size = u32_at(end, 12) as u64;
        let mut dir_offset = u32_at(end, 16) as u64;
        let end_pos = tail_start + end_at as u64;
        // A ZIP64 locator right before the end record points at the ZIP64 end record, whose
        // counts and offsets are the true ones, whatever the classic record says.
        if end_pos >= 20 {
            let locator = self.read_at(end_pos - 20, 20)?;
            if u32_at(&locator, 0) == LOCATOR64_SIG {
                let end64_pos = u64_at(&locator, 8);
                let end64 = self.read_at(end64_pos, 56)?;
                if u32_at(&end64, 0) != END64_SIG {
                    return Err(
                        self.bad(format!("the ZIP64 locator points at byte {end64_pos}, which is no ZIP64 end record"))
                    );
                }
                count = u64_at(&end64, 32);
                dir_size = u64_at(&end64, 40);
                dir_offset = u64_at(&end64, 48);
            }
        }
        if dir_offset.checked_add(dir_size).is_none_or(|end| end > end_pos) {
            return Err(self.bad(format!(
                "the central directory (byte {dir_offset}, {dir_size} bytes) does not fit before the end record"
            )));
        }
        // Each central record is at least 46 bytes: a damaged count cannot make us allocate much.
        if count > dir_size / 46 {
            return Err(self.bad(format!("{count} entries cannot fit in a {dir_size}-byte central directory")));
        }
        let dir = self.read_at(dir_offset, dir_size as usize)?;
        let mut entries = Vec::with_capacity(count as usize);
        let mut at = 0usize;
        for index in 0..count {
            if at + 46 > dir.len() || u32_at(&dir, at) != CENTRAL_SIG {
                return Err(self.bad(format!("central directory record {index} is damaged")));
            }
            let name_len = u16_at(&dir, at + 28) as usize;
            let extra_len = u16_at(&dir, at + 30) as usize;
            let comment_len = u16_at(&dir, at + 32) as usize;
            let record_end = at + 46 + name_len + extra_len + comment_len;
            if record_end > dir.len() {
                return Err(self.bad(format!("central directory record {index} runs past the directory")));
            }
            let name = String::from_utf8_lossy(&dir[at + 46..at + 46 + name_len]).into_owned();
            let mut entry = ZipEntry {
                name,
                method: u16_at(&dir, at + 10),
                crc32: u32_at(&dir, at + 16),
                compressed_size: u32_at(&dir, at + 20) as u64,
                size: u32_at(&dir, at + 24) as u64,
                local_header_offset: u32_at(&dir, at + 42) as u64,
            };
            // The ZIP64 extra field (id 1) holds, in this order, each of the three values whose
            // 32-bit field is 0xFFFFFFFF.
            let extra = &dir[at + 46 + name_len..at + 46 + name_len + extra_len];
            let mut e = 0;
            while e + 4 <= extra.len() {
                let (id, len) = (u16_at(extra, e), u16_at(extra, e + 2) as usize);
                let body = extra
                    .get(e + 4..e + 4 + len)
                    .ok_or_else(|| self.bad(format!("entry `{}`: damaged extra field", entry.name)))?;
                if id == 1 {
                    let mut values = body.chunks_exact(8).map(|c| u64_at(c, 0));
                    for field in [&mut entry.size, &mut entry.compressed_size, &mut entry.local_header_offset] {
                        if *field == u32::MAX as u64 {
                            *field = values
                                .next()
                                .ok_or_else(|| self.bad(format!("entry `{}`: short ZIP64 field", entry.name)))?;
                        }
                    }
                }
                e += 4 + len;
            }
            entries.push(entry);
            at = record_end;
        }
        Ok(entries)
    }

    /// The byte offset of an entry's data (after its local header).
    fn data_offset(&mut self, entry: &ZipEntry) -> Result<u64> {
        let local = self.read_at(entry.local_header_offset, 30)?;
        if u32_at(&local, 0) != LOCAL_SIG {
            return Err(
                self.bad(format!("entry `{}`: no local header at byte {}", entry.name, entry.local_header_offset))
            );
        }
        let start = entry.local_header_offset + 30 + u16_at(&local, 26) as u64 + u16_at(&local, 28) as u64;
        if start.checked_add(entry.compressed_size).is_none_or(|end| end > self.len) {
            return Err(self.bad(format!(
                "entry `{}` ({} bytes) runs past the end of the file",
                entry.name, entry.compressed_size
            )));
        }
        Ok(start)
    }

    /// The whole content of entry `name` (stored or deflated), checked against its CRC-32.
    pub fn read(&mut self, name: &str) -> Result<Vec<u8>> {
        let entry = self.entry(name)?.clone();
        let start = self.data_offset(&entry)?;
        let raw = self.read_at(start, entry.compressed_size as usize)?;
        let bytes = match entry.method {
            STORED => raw,
            DEFLATED => {
                let mut out = Vec::with_capacity(entry.size.min(1 << 30) as usize);
                flate2::read::DeflateDecoder::new(&raw[..])
                    .take(entry.size)
                    .read_to_end(&mut out)
                    .map_err(|e| self.bad(format!("entry `{name}`: {e}")))?;
                out
            }
            other => return Err(self.bad(format!("entry `{name}`: compression method {other} is not supported"))),
        };
        if bytes.len() as u64 != entry.size {
            return Err(self.bad(format!("entry `{name}`: {} bytes, the directory says {}", bytes.len(), entry.size)));
        }
        let mut crc = flate2::Crc::new();
        crc.update(&bytes);
        if crc.sum() != entry.crc32 {
            return Err(self.bad(format!("entry `{name}`: CRC-32 mismatch (the file is damaged)")));
        }
        Ok(bytes)
    }

    /// A reader over the whole of stored entry `name`, without loading it, that checks the
    /// entry's CRC-32 when its last byte has been read: reading past the end of a damaged entry
    /// fails with `InvalidData` naming the archive. For streams that are read to their end
    /// (large arrays, whole tensor storages).
    pub fn verified_reader(&mut self, name: &str) -> Result<VerifiedReader<'_>> {
        let entry = self.entry(name)?.clone();
        if entry.method != STORED {
            return Err(self.bad(format!("entry `{name}` is compressed; it cannot be streamed")));
        }
        let start = self.data_offset(&entry)?;
        let path = self.path.clone();
        self.file.seek(SeekFrom::Start(start)).map_err(|source| ZipError::Io { path: path.clone(), source })?;
        Ok(VerifiedReader {
            inner: (&mut self.file).take(entry.size),
            crc: flate2::Crc::new(),
            want: entry.crc32,
            left: entry.size,
            what: format!("{}: entry `{name}`", path.display()),
        })
    }

    /// A reader over the bytes `[skip, size)` of stored entry `name`, without loading them; for
    /// parts of large arrays and tensors. (No CRC check: the bytes are not all read; see
    /// [`Self::verified_reader`].)
    pub fn stored_reader(&mut self, name: &str, skip: u64) -> Result<impl Read + '_> {
        let entry = self.entry(name)?.clone();
        if entry.method != STORED {
            return Err(self.bad(format!("entry `{name}` is compressed; it cannot be streamed")));
        }
        if skip > entry.size {
            return Err(self.bad(format!("entry `{name}`: offset {skip} is past its {} bytes", entry.size)));
        }
        let start = self.data_offset(&entry)?;
        let path = self.path.clone();
        self.file.seek(SeekFrom::Start(start + skip)).map_err(|source| ZipError::Io { path, source })?;
        Ok((&mut self.file).take(entry.size - skip))
    }
}

/// See [`ZipReader::verified_reader`].
pub struct VerifiedReader<'a> {
    inner: std::io::Take<&'a mut std::io::BufReader<std::fs::File>>,
    crc: flate2::Crc,
    want: u32,
    left: u64,
    what: String,
}

impl VerifiedReader<'_> {
    /// Reads what is left of the entry (a caller that stopped early) and checks the CRC.
    pub fn finish(mut self) -> std::io::Result<()> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok(())
    }
}

impl Read for VerifiedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.left -= n as u64;
        if self.left == 0 && n > 0 && self.crc.sum() != self.want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: CRC-32 mismatch (the file is damaged)", self.what),
            ));
        }
        Ok(n)
    }
}

/// Streams stored (uncompressed) entries into a new archive at `path`, through a temporary file
/// beside it that replaces `path` only when [`finish`](Self::finish) succeeds.
pub struct StoredZipWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
    written: Vec<(String, u64, u32, u64)>, // name, size, crc, local header offset
    open: Option<OpenEntry>,
    offset: u64,
}

struct OpenEntry {
    name: String,
    size: u64,
    written: u64,
    crc: flate2::Crc,
    header_offset: u64,
}

/// Whether a value needs its ZIP64 field (the 32-bit one is saturated at 0xFFFFFFFF).
fn needs64(v: u64) -> bool {
    v >= u32::MAX as u64
}

impl StoredZipWriter {
    /// Starts a new archive (the target appears only at [`finish`](Self::finish)).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| ZipError::Io { path: parent.to_path_buf(), source })?;
        }
        let tmp = crate::util::temp_path(path, std::process::id());
        let file = File::create(&tmp).map_err(|source| ZipError::Io { path: tmp.clone(), source })?;
        Ok(StoredZipWriter {
            path: path.to_path_buf(),
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
            written: Vec::new(),
            open: None,
            offset: 0,
        })
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> ZipError + '_ {
        |source| ZipError::Io { path: self.tmp.clone(), source }
    }

    fn usage(&self, reason: String) -> ZipError {
        ZipError::Usage { path: self.path.clone(), reason }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|source| ZipError::Io { path: self.tmp.clone(), source })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Starts entry `name` of exactly `size` bytes; write them with [`write`](Self::write).
    pub fn start_entry(&mut self, name: &str, size: u64) -> Result<()> {
        if self.open.is_some() {
            return Err(self.usage(format!("entry `{name}` started before the previous one was finished")));
        }
        let header_offset = self.offset;
        let zip64 = needs64(size);
        let mut header = Vec::with_capacity(30 + name.len() + 20);
        header.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        header.extend_from_slice(&(if zip64 { 45u16 } else { 20 }).to_le_bytes()); // version needed
        header.extend_from_slice(&0u16.to_le_bytes()); // flags
        header.extend_from_slice(&STORED.to_le_bytes());
        header.extend_from_slice(&[0, 0, 0x21, 0]); // time 00:00, date 1980-01-01
        header.extend_from_slice(&0u32.to_le_bytes()); // CRC, patched in finish_entry
        let size32 = if zip64 { u32::MAX } else { size as u32 };
        header.extend_from_slice(&size32.to_le_bytes());
        header.extend_from_slice(&size32.to_le_bytes());
        header.extend_from_slice(&(name.len() as u16).to_le_bytes());
        header.extend_from_slice(&(if zip64 { 20u16 } else { 0 }).to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        if zip64 {
            header.extend_from_slice(&1u16.to_le_bytes());
            header.extend_from_slice(&16u16.to_le_bytes());
            header.extend_from_slice(&size.to_le_bytes());
            header.extend_from_slice(&size.to_le_bytes());
        }
        self.put(&header)?;
        self.open =
            Some(OpenEntry { name: name.to_string(), size, written: 0, crc: flate2::Crc::new(), header_offset });
        Ok(())
    }

    /// Appends bytes to the open entry.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Err(self.usage("bytes written with no entry open".to_string()));
        };
        open.written += bytes.len() as u64;
        if open.written > open.size {
            let reason = format!("entry `{}`: more than the announced {} bytes", open.name, open.size);
            return Err(self.usage(reason));
        }
        open.crc.update(bytes);
        self.put(bytes)
    }

    /// Closes the open entry: checks its length and writes its CRC into its local header.
    pub fn finish_entry(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Err(self.usage("finish_entry with no entry open".to_string()));
        };
        if open.written != open.size {
            return Err(
                self.usage(format!("entry `{}`: {} bytes written, {} announced", open.name, open.written, open.size))
            );
        }
        let crc = open.crc.sum();
        self.file.flush().map_err(self.io())?;
        let file = self.file.get_mut();
        let patched = file
            .seek(SeekFrom::Start(open.header_offset + 14))
            .and_then(|_| file.write_all(&crc.to_le_bytes()))
            .and_then(|_| file.seek(SeekFrom::End(0)));
        patched.map_err(|source| ZipError::Io { path: self.tmp.clone(), source })?;
        self.written.push((open.name, open.size, crc, open.header_offset));
        Ok(())
    }

    /// Writes the central directory and end records, then renames the archive into place.
    pub fn finish(mut self) -> Result<()> {
        if let Some(open) = &self.open {
            return Err(self.usage(format!("entry `{}` was not finished", open.name)));
        }
        let dir_offset = self.offset;
        let entries = std::mem::take(&mut self.written);
        let mut any64 = false;
        for (name, size, crc, header_offset) in &entries {
            let mut extra = Vec::new();
            for v in [*size, *size, *header_offset] {
                if needs64(v) {
                    extra.extend_from_slice(&v.to_le_bytes());
                }
            }
            any64 |= !extra.is_empty();
            let clip = |v: u64| if needs64(v) { u32::MAX } else { v as u32 };
            let mut record = Vec::with_capacity(46 + name.len() + 28);
            record.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
            record.extend_from_slice(&45u16.to_le_bytes()); // made by
            record.extend_from_slice(&(if extra.is_empty() { 20u16 } else { 45 }).to_le_bytes());
            record.extend_from_slice(&0u16.to_le_bytes());
            record.extend_from_slice(&STORED.to_le_bytes());
            record.extend_from_slice(&[0, 0, 0x21, 0]);
            record.extend_from_slice(&crc.to_le_bytes());
            record.extend_from_slice(&clip(*size).to_le_bytes());
            record.extend_from_slice(&clip(*size).to_le_bytes());
            record.extend_from_slice(&(name.len() as u16).to_le_bytes());
            let extra_len = if extra.is_empty() { 0 } else { 4 + extra.len() };
            record.extend_from_slice(&(extra_len as u16).to_le_bytes());
            record.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
            record.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // external: a regular file
            record.extend_from_slice(&clip(*header_offset).to_le_bytes());
            record.extend_from_slice(name.as_bytes());
            if !extra.is_empty() {
                record.extend_from_slice(&1u16.to_le_bytes());
                record.extend_from_slice(&(extra.len() as u16).to_le_bytes());
                record.extend_from_slice(&extra);
            }
            self.put(&record)?;
        }
        let dir_size = self.offset - dir_offset;
        let count = entries.len() as u64;
        if any64 || needs64(dir_offset) || needs64(dir_size) || count >= 0xFFFF {
            let end64_offset = self.offset;
            let mut end64 = Vec::with_capacity(76);
            end64.extend_from_slice(&END64_SIG.to_le_bytes());
            end64.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
            end64.extend_from_slice(&45u16.to_le_bytes());
            end64.extend_from_slice(&45u16.to_le_bytes());
            end64.extend_from_slice(&[0; 8]); // disk numbers
            end64.extend_from_slice(&count.to_le_bytes());
            end64.extend_from_slice(&count.to_le_bytes());
            end64.extend_from_slice(&dir_size.to_le_bytes());
            end64.extend_from_slice(&dir_offset.to_le_bytes());
            end64.extend_from_slice(&LOCATOR64_SIG.to_le_bytes());
            end64.extend_from_slice(&0u32.to_le_bytes());
            end64.extend_from_slice(&end64_offset.to_le_bytes());
            end64.extend_from_slice(&1u32.to_le_bytes());
            self.put(&end64)?;
        }
        let mut end = Vec::with_capacity(22);
        end.extend_from_slice(&END_SIG.to_le_bytes());
        end.extend_from_slice(&[0; 4]);
        let count16 = count.min(0xFFFF) as u16;
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&count16.to_le_bytes());
        end.extend_from_slice(&(dir_size.min(u32::MAX as u64) as u32).to_le_bytes());
        end.extend_from_slice(&(dir_offset.min(u32::MAX as u64) as u32).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.put(&end)?;
        self.file.flush().map_err(self.io())?;
        self.file.get_ref().sync_all().map_err(self.io())?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| ZipError::Io { path: self.path.clone(), source })?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for StoredZipWriter {
    /// An archive never finished (an error, a panic) leaves no temporary file behind.
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_archive(path: &Path, entries: &[(&str, &[u8])]) {
        let mut zip = StoredZipWriter::create(path).unwrap();
        for (name, bytes) in entries {
            zip.start_entry(name, bytes.len() as u64).unwrap();
            for chunk in bytes.chunks(7) {
                zip.write(chunk).unwrap();
            }
            zip.finish_entry().unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn written_entries_read_back_with_their_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        let long: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        write_archive(&path, &[("x/one", b"hello"), ("empty", b""), ("x/long.bin", &long)]);
        let mut zip = ZipReader::open(&path).unwrap();
        let names: Vec<_> = zip.entries().iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["x/one", "empty", "x/long.bin"]);
        assert_eq!(zip.read("x/one").unwrap(), b"hello");
        assert_eq!(zip.read("empty").unwrap(), b"");
        assert_eq!(zip.read("x/long.bin").unwrap(), long);
        let mut tail = Vec::new();
        zip.stored_reader("x/long.bin", 9_990).unwrap().read_to_end(&mut tail).unwrap();
        assert_eq!(tail, &long[9_990..]);
        assert!(zip.read("nope").unwrap_err().to_string().contains("no entry `nope`"));
        // No temporary file is left beside the archive.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The classic end record's fields saturated at 0xFFFF…, with the true values in ZIP64
    /// records, as writers do past 4 GiB; and ZIP64 records present while the classic fields are
    /// *not* saturated, as `torch.save` writes them: both read through the locator.
    #[test]
    fn zip64_end_records_are_followed_whether_or_not_the_classic_record_announces_them() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.zip");
        write_archive(&plain, &[("a", b"first"), ("bb", b"second")]);
        let bytes = std::fs::read(&plain).unwrap();
        let end = bytes.len() - 22;
        let dir_size = u32_at(&bytes, end + 12) as u64;
        let dir_offset = u32_at(&bytes, end + 16) as u64;
        for saturate in [false, true] {
            let mut out = bytes[..end].to_vec();
            let end64_offset = out.len() as u64;
            out.extend_from_slice(&END64_SIG.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&2u64.to_le_bytes());
            out.extend_from_slice(&2u64.to_le_bytes());
            out.extend_from_slice(&dir_size.to_le_bytes());
            out.extend_from_slice(&dir_offset.to_le_bytes());
            out.extend_from_slice(&LOCATOR64_SIG.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&end64_offset.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            let mut classic = bytes[end..].to_vec();
            if saturate {
                classic[8..12].copy_from_slice(&[0xFF; 4]);
                classic[12..20].copy_from_slice(&[0xFF; 8]);
            }
            out.extend_from_slice(&classic);
            let path = dir.path().join(format!("z64-{saturate}.zip"));
            std::fs::write(&path, &out).unwrap();
            let mut zip = ZipReader::open(&path).unwrap();
            assert_eq!(zip.read("bb").unwrap(), b"second", "saturated: {saturate}");
        }
    }

    #[test]
    fn entries_past_four_gibibytes_get_zip64_fields() {
        // Only the records are checked (writing 4 GiB in a test is too slow): a large announced
        // size must produce a ZIP64 local extra field, and a mismatch in length is an error.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.zip");
        let mut zip = StoredZipWriter::create(&path).unwrap();
        zip.start_entry("big", 5 << 30).unwrap();
        zip.write(b"abc").unwrap();
        let err = zip.finish_entry().unwrap_err().to_string();
        assert!(err.contains("3 bytes written, 5368709120 announced"), "{err}");
        drop(zip);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the temporary file is removed");
    }

    #[test]
    fn damaged_archives_give_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.zip");
        write_archive(&path, &[("a", b"0123456789")]);
        let good = std::fs::read(&path).unwrap();
        for (what, bytes) in [
            ("truncated", good[..good.len() - 5].to_vec()),
            ("empty", Vec::new()),
            ("flipped data", {
                let mut b = good.clone();
                b[35] ^= 1;
                b
            }),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let err = ZipReader::open(&path).and_then(|mut z| z.read("a")).unwrap_err().to_string();
            assert!(err.contains("d.zip"), "{what}: {err}");
        }
    }
}
