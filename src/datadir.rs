//! The data directory: disk images, the node id and the start epoch.
//!
//! Layout: `disk0.img` … `diskN-1.img` (sparse files), `node-id` (16 hex digits when
//! generated, written once; an operator may write any `--node-id` value there instead,
//! a name included), `epoch` (decimal, +1 on every start). Small files are replaced
//! atomically (write to a temporary file, fsync, rename, fsync the directory).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{parse_node_id, NodeId};

#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    pub fn open(path: &Path) -> anyhow::Result<DataDir> {
        fs::create_dir_all(path)
            .with_context(|| format!("cannot create data directory {}", path.display()))?;
        Ok(DataDir {
            path: path.to_path_buf(),
        })
    }

    /// The node id kept in the data directory, generated on first start. The file
    /// holds a node id in `--node-id` syntax ([`parse_node_id`]); the one generated is
    /// 16 hex digits.
    pub fn node_id(&self) -> anyhow::Result<NodeId> {
        let file = self.path.join("node-id");
        match fs::read_to_string(&file) {
            Ok(text) => parse_node_id(&text).map_err(|why| {
                anyhow::anyhow!(
                    "{} is corrupt: {why}, found {:?}",
                    file.display(),
                    text.trim()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id: u64 = rand::random::<u64>().max(1);
                self.replace("node-id", format!("{id:016x}\n").as_bytes())?;
                tracing::info!(node_id = %format!("{id:016x}"), "generated a new node id");
                Ok(NodeId { id, name: None })
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
        }
    }

    /// Increments and returns the start epoch.
    pub fn next_epoch(&self) -> anyhow::Result<u64> {
        let file = self.path.join("epoch");
        let epoch = match fs::read_to_string(&file) {
            Ok(text) => text.trim().parse::<u64>().with_context(|| {
                format!(
                    "{} is corrupt: expected a number, found {:?}",
                    file.display(),
                    text.trim()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        };
        let next = epoch + 1;
        self.replace("epoch", format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// Opens (creating sparse where missing) `count` disk images of `size` bytes.
    pub fn open_disks(&self, count: u16, size: u64) -> anyhow::Result<Vec<nvme::file::FileDevice>> {
        let mut disks = Vec::new();
        for i in 0..count {
            let path = self.path.join(format!("disk{i}.img"));
            let dev = nvme::file::FileDevice::open(&path, size)
                .with_context(|| format!("cannot open disk {i} ({})", path.display()))?;
            disks.push(dev);
        }
        // Disks beyond `count` from an earlier run are left alone, but say so: their
        // objects are not served.
        let extra = self.path.join(format!("disk{count}.img"));
        if extra.exists() {
            tracing::warn!(path = %extra.display(), "disk image beyond --disks is present and not used");
        }
        if disks.is_empty() {
            bail!("no disks configured");
        }
        Ok(disks)
    }

    fn replace(&self, name: &str, contents: &[u8]) -> anyhow::Result<()> {
        let target = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)?;
            fs::File::open(&self.path)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", target.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_id_file_is_generated_once_and_may_hold_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        let first = d.node_id().unwrap();
        assert_eq!(first.name, None);
        let text = fs::read_to_string(dir.path().join("node-id")).unwrap();
        assert_eq!(text, format!("{:016x}\n", first.id));
        assert_eq!(d.node_id().unwrap(), first, "kept, not generated again");
        fs::write(dir.path().join("node-id"), "rack3-b\n").unwrap();
        let named = d.node_id().unwrap();
        assert_eq!(named.name.as_ref().map(|n| n.as_str()), Some("rack3-b"));
        assert_eq!(named.id, named.name.unwrap().node_id());
        fs::write(dir.path().join("node-id"), "not a name\n").unwrap();
        let e = d.node_id().unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("not a name"), "{e}");
    }
}
