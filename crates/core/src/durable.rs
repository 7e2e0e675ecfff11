//! Small files replaced whole: a reader sees the old content or the new, never
//! half of either, and once [`write_atomically`] returns the new content
//! survives a crash or a power cut.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

/// Replaces `path` with `bytes`: writes a temporary file next to it, syncs it,
/// renames it over `path` and syncs the folder, so that the rename itself is on
/// stable storage.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// `path` with `.tmp` appended (`globalconf.json` -> `globalconf.json.tmp`), so
/// that two files of one folder never share a temporary name.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Syncs the folder holding `path`, which makes a rename in it durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.txt");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.txt")]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.txt");
        write_atomically(&path, b"one").unwrap();
        // A folder in the way of the temporary file makes the write fail.
        std::fs::create_dir(temporary(&path)).unwrap();
        assert!(write_atomically(&path, b"two").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }
}
