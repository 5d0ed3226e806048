//! Named datastores: the folders an agent keeps its VMs in.
//!
//! An agent serves one or more datastores (`--datastore name=PATH[,shared]`, repeatable; a
//! bare `--datastore PATH` is one datastore named `default`); the first is the default. A
//! **shared** datastore is one folder that several hosts' agents see (NFS, a cluster file
//! system): each VM folder in it holds an `.owner` file naming the agent that owns the VM,
//! written atomically (temp file, `fsync`, rename), and an agent loads only the VM folders it
//! owns, so two agents never both run one VM. A folder of a non-shared datastore belongs to
//! the agent holding the datastore's `.agent.lock`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file of a VM folder on a shared datastore that names its owning agent.
pub const OWNER: &str = ".owner";

/// One datastore of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    /// Its name (`default` for a bare `--datastore PATH`).
    pub name: String,
    /// Its folder.
    pub path: PathBuf,
    /// Seen by other hosts' agents too.
    pub shared: bool,
}

/// A bad `--datastore` argument or set of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatastoreSpecError {
    /// Not `name=PATH[,shared]` or `PATH`.
    #[error("--datastore {arg:?}: {why} (write PATH, or NAME=PATH, or NAME=PATH,shared)")]
    Syntax {
        /// The argument.
        arg: String,
        /// What is wrong.
        why: String,
    },
    /// Two datastores with one name.
    #[error("two datastores are named {0:?}: each --datastore needs its own name")]
    Duplicate(String),
    /// Two datastores with one folder.
    #[error("two datastores use the folder {0}")]
    SamePath(PathBuf),
    /// None at all.
    #[error("no --datastore given: an agent needs at least one")]
    None,
}

/// Checks a datastore name: 1-32 letters, digits, `-` or `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Datastore {
    /// Parses one `--datastore` argument: `PATH` (named `default`), `NAME=PATH` or
    /// `NAME=PATH,shared`.
    pub fn parse(arg: &str) -> Result<Datastore, DatastoreSpecError> {
        let bad = |why: &str| DatastoreSpecError::Syntax {
            arg: arg.into(),
            why: why.into(),
        };
        let (name, rest) = match arg.split_once('=') {
            Some((n, r)) => (n, r),
            None => ("default", arg),
        };
        if !valid_name(name) {
            return Err(bad("a name is 1-32 letters, digits, '-' or '_'"));
        }
        let (path, shared) = match rest.rsplit_once(',') {
            Some((p, "shared")) => (p, true),
            Some((_, other)) if !other.contains('/') => {
                return Err(bad(&format!("unknown option {other:?} (valid: shared)")))
            }
            _ => (rest, false),
        };
        if path.is_empty() {
            return Err(bad("no folder"));
        }
        Ok(Datastore {
            name: name.into(),
            path: path.into(),
            shared,
        })
    }

    /// Checks a set of datastores: at least one, names and folders distinct.
    pub fn check_all(all: &[Datastore]) -> Result<(), DatastoreSpecError> {
        if all.is_empty() {
            return Err(DatastoreSpecError::None);
        }
        for (i, d) in all.iter().enumerate() {
            for e in &all[..i] {
                if e.name == d.name {
                    return Err(DatastoreSpecError::Duplicate(d.name.clone()));
                }
                if e.path == d.path {
                    return Err(DatastoreSpecError::SamePath(d.path.clone()));
                }
            }
        }
        Ok(())
    }

    /// Free and total bytes of the file system holding the datastore (`statvfs`).
    pub fn space(&self) -> std::io::Result<Space> {
        space_of(&self.path)
    }
}

/// Free and total bytes of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Bytes an unprivileged writer may still use.
    pub free: u64,
    /// Size of the file system.
    pub total: u64,
}

/// `statvfs` of the file system holding `path`.
pub fn space_of(path: &Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that lives across the call, and `st` is a
    // writable `statvfs` the kernel fills; nothing else is read or kept.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(Space {
        free: st.f_bavail as u64 * frsize,
        total: st.f_blocks as u64 * frsize,
    })
}

/// The agent named in a VM folder's `.owner` file, if there is one.
pub fn owner_of(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(OWNER))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Writes `dir/name` atomically and durably: a temp file, `fsync`, rename, `fsync` of `dir`.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// `fsync` of a folder: a rename or a new entry in it is durable afterwards.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Records `agent` as the owner of the VM folder `dir` (atomically, durably).
pub fn set_owner(dir: &Path, agent: &str) -> std::io::Result<()> {
    write_atomic(dir, OWNER, format!("{agent}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_arguments_parse_or_say_why() {
        assert_eq!(
            Datastore::parse("/var/lib/vmig/a").unwrap(),
            Datastore {
                name: "default".into(),
                path: "/var/lib/vmig/a".into(),
                shared: false
            }
        );
        let d = Datastore::parse("fast=/srv/fast,shared").unwrap();
        assert_eq!((d.name.as_str(), d.shared), ("fast", true));
        assert_eq!(d.path, PathBuf::from("/srv/fast"));
        let d = Datastore::parse("slow=/srv/a,b").unwrap_err().to_string();
        assert!(
            d.contains("unknown option \"b\"") && d.contains("shared"),
            "{d}"
        );
        assert!(Datastore::parse("b d=/x").is_err());
        assert!(Datastore::parse("x=").is_err());
        let a = Datastore::parse("a=/x").unwrap();
        let b = Datastore::parse("a=/y").unwrap();
        assert_eq!(
            Datastore::check_all(&[a.clone(), b]),
            Err(DatastoreSpecError::Duplicate("a".into()))
        );
        let c = Datastore::parse("c=/x").unwrap();
        assert!(matches!(
            Datastore::check_all(&[a, c]),
            Err(DatastoreSpecError::SamePath(_))
        ));
        assert_eq!(Datastore::check_all(&[]), Err(DatastoreSpecError::None));
    }

    #[test]
    fn owner_files_are_written_whole_and_space_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(owner_of(dir.path()), None);
        set_owner(dir.path(), "hostA").unwrap();
        set_owner(dir.path(), "hostB").unwrap();
        assert_eq!(owner_of(dir.path()).as_deref(), Some("hostB"));
        assert!(!dir.path().join(".owner.tmp").exists());
        let s = space_of(dir.path()).unwrap();
        assert!(s.total > 0 && s.free <= s.total, "{s:?}");
    }

    #[test]
    fn vms_live_on_named_datastores_and_shared_ones_load_only_their_owners_vms() {
        use crate::inventory::{Inventory, VmDef};
        let dir = tempfile::tempdir().unwrap();
        let ds = |n: &str, shared| Datastore {
            name: n.into(),
            path: dir.path().join(n),
            shared,
        };
        let def = |n: &str| {
            VmDef::parse(&format!(
                "name = \"{n}\"\nmemory_mib = 16\nvcpus = 1\nworkload = [\"idle\"]\ndirty_mib = 1\ndisk_mib = 1\n"
            ))
            .unwrap()
        };
        let a =
            Inventory::open_many("hostA", vec![ds("a", false), ds("s", true)], 1 << 30).unwrap();
        a.create(def("vm1")).unwrap();
        let i = a.create_on(def("vm2"), Some("s")).unwrap();
        assert_eq!(i.datastore, "s");
        assert_eq!(i.dir, dir.path().join("s/vm2"));
        assert_eq!(owner_of(&i.dir).as_deref(), Some("hostA"));
        let e = a
            .create_on(def("vm3"), Some("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("valid: a, s"), "{e}");
        let infos = a.datastore_infos();
        assert_eq!(infos[0].vms, ["vm1"]);
        assert_eq!(infos[1].vms, ["vm2"]);
        // Another agent on the shared datastore does not take hostA's VM.
        let b =
            Inventory::open_many("hostB", vec![ds("b", false), ds("s", true)], 1 << 30).unwrap();
        assert!(b.list().is_empty());
        let e = b.create_on(def("vm2"), Some("s")).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
        // hostA again: both VMs, each on its datastore.
        drop(a);
        let a =
            Inventory::open_many("hostA", vec![ds("a", false), ds("s", true)], 1 << 30).unwrap();
        let names: Vec<_> = a
            .list()
            .into_iter()
            .map(|i| (i.def.name, i.datastore))
            .collect();
        assert_eq!(
            names,
            [("vm1".into(), "a".into()), ("vm2".into(), "s".into())]
        );
    }
}
