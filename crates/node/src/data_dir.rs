//! The node's data directory: identity key, peer store, lock, API socket and
//! token.
//!
//! ```text
//! DATA_DIR/
//!   identity.key   the ed25519 secret key (mode 0600)
//!   config.toml    optional configuration
//!   peers.redb     peers met and their last addresses
//!   daemon.lock    held (flock) by the running daemon; holds its pid
//!   api.sock       the local API (Unix socket, mode 0600)
//!   api.token      bearer token for the optional TCP API (mode 0600)
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use p2pos_proto::Keypair;

const KEY_HEADER: &str = "p2pos secret key v1";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file can be read by other users.
    #[error("identity key {path} is readable by other users (mode {mode:o}); fix it with: chmod 600 {path}")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file is not in the expected format.
    #[error("identity key {path} is corrupt ({reason}); restore it from a backup, or move it away to create a new identity (a new peer ID)")]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file system failed.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// No randomness for a new key.
    #[error("the operating system gave no randomness for a new key: {0}")]
    Random(String),
}

/// The data directory of one node.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Opens (and creates, mode 0700) the data directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, IdentityError> {
        let root = root.into();
        if !root.exists() {
            fs::create_dir_all(&root).map_err(|source| IdentityError::Io {
                path: root.clone(),
                source,
            })?;
            let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o700));
        }
        Ok(DataDir { root })
    }

    /// The platform's default data directory (`$XDG_DATA_HOME/p2pos` or
    /// `~/.local/share/p2pos` on Linux).
    pub fn default_path() -> PathBuf {
        directories::ProjectDirs::from("org", "p2pos", "p2pos")
            .map(|d| d.data_dir().to_path_buf())
            .unwrap_or_else(|| PathBuf::from(".p2pos"))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The local API's Unix socket.
    pub fn api_socket(&self) -> PathBuf {
        self.file("api.sock")
    }

    /// Loads the identity, creating it on first use.
    pub fn load_or_create_identity(&self) -> Result<Keypair, IdentityError> {
        let path = self.file("identity.key");
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(IdentityError::Permissions { path, mode });
                }
                let text = fs::read_to_string(&path).map_err(|_| IdentityError::Corrupt {
                    path: path.clone(),
                    reason: "not text",
                })?;
                parse_key_file(&text).map_err(|reason| IdentityError::Corrupt { path, reason })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
                let keypair = Keypair::from_seed(seed);
                // Write a temporary file, then link it into place: another
                // process creating the identity at the same moment either
                // wins (and we load its key) or loses; nobody reads half a
                // file.
                let tmp = self.file(&format!(".identity.key.{}", std::process::id()));
                let _ = fs::remove_file(&tmp);
                write_private(&tmp, format_key_file(&keypair).as_bytes()).map_err(|source| {
                    IdentityError::Io {
                        path: tmp.clone(),
                        source,
                    }
                })?;
                let linked = fs::hard_link(&tmp, &path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(keypair),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        self.load_or_create_identity()
                    }
                    Err(source) => Err(IdentityError::Io { path, source }),
                }
            }
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// Reads the API token, creating a new random one if there is none.
    pub fn load_or_create_token(&self) -> Result<String, IdentityError> {
        let path = self.file("api.token");
        if let Ok(token) = fs::read_to_string(&path) {
            let token = token.trim().to_owned();
            if token.len() >= 32 {
                return Ok(token);
            }
        }
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).map_err(|e| IdentityError::Random(e.to_string()))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let _ = fs::remove_file(&path);
        write_private(&path, format!("{token}\n").as_bytes())
            .map_err(|source| IdentityError::Io { path, source })?;
        Ok(token)
    }
}

fn format_key_file(keypair: &Keypair) -> String {
    let hex: String = keypair.seed().iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_HEADER}\n{hex}\n# peer id: {}\n", keypair.peer_id())
}

fn parse_key_file(text: &str) -> Result<Keypair, &'static str> {
    let mut lines = text.lines();
    if lines.next() != Some(KEY_HEADER) {
        return Err("missing header line");
    }
    let hex = lines.next().ok_or("missing key line")?.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("key line is not 64 hex digits");
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "bad hex")?;
    }
    Ok(Keypair::from_seed(seed))
}

/// Creates `path` with mode 0600 and writes `contents`.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        let a = data.load_or_create_identity().unwrap();
        let b = data.load_or_create_identity().unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        let mode = fs::metadata(data.file("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn readable_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        data.load_or_create_identity().unwrap();
        let path = data.file("identity.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = data.load_or_create_identity().unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn corrupt_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        write_private(&data.file("identity.key"), b"p2pos secret key v1\nzz\n").unwrap();
        let err = data.load_or_create_identity().unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
    }
}
