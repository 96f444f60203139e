//! Key material: loaded from `SECRET_KEY` or generated once into `DATA_DIR/secret.key` (mode
//! 0600), and split with HKDF-SHA256 into independent keys, one per purpose, so that no key is
//! used for two jobs.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::config::ConfigError;
use crate::secret::Secret;

/// File name of the generated key inside `DATA_DIR`.
pub const KEY_FILE: &str = "secret.key";

/// Version byte in front of every sealed value, so the format can change later.
const SEALED_V1: u8 = 1;
const NONCE_LEN: usize = 12;

/// Sealed data that cannot be opened: wrong key, or the bytes were changed.
#[derive(Debug, thiserror::Error)]
#[error("sealed value cannot be opened (wrong SECRET_KEY or corrupted data)")]
pub struct OpenError;

/// The service's keys, each derived from the one key material.
pub struct Keys {
    at_rest: Aes256Gcm,
    state_signing: [u8; 32],
    link_signing: [u8; 32],
    fingerprint: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Uses `secret_key` when given; otherwise reads `data_dir/secret.key`, generating it
    /// (32 random bytes, hex, mode 0600) on first start. Problems name `SECRET_KEY`, or
    /// `DATA_DIR` when the key file cannot be written there. No key is generated next to an
    /// embedded database whose secrets a key already sealed: that key was lost, and a new
    /// one would never open them.
    pub fn load_or_generate(
        secret_key: Option<&Secret>,
        data_dir: &Path,
    ) -> Result<Self, ConfigError> {
        Self::load_or_generate_for(secret_key, data_dir, true)
    }

    /// [`Keys::load_or_generate`]; with `embedded_host` false (a remote host engine keeps the
    /// secrets), an embedded database left in `data_dir` from an earlier setup does not stop a
    /// key from being generated.
    pub fn load_or_generate_for(
        secret_key: Option<&Secret>,
        data_dir: &Path,
        embedded_host: bool,
    ) -> Result<Self, ConfigError> {
        if let Some(keys) = Self::load(secret_key, data_dir)? {
            return Ok(keys);
        }
        let path = data_dir.join(KEY_FILE);
        if embedded_host {
            refuse_over_sealed_database(data_dir, &path)?;
        }
        let mut bytes = [0u8; 40];
        getrandom::fill(&mut bytes)
            .map_err(|e| key_problem(format!("no randomness to generate a key: {e}")))?;
        let (key, nonce) = bytes.split_at(32);
        let material = hex::encode(key);
        // Written whole to a private temporary file, then linked into place: a crash leaves
        // either no key file or a complete one, and of two processes starting at once on one
        // DATA_DIR, the second finds the first one's key instead of replacing it.
        let temporary = data_dir.join(format!(".{KEY_FILE}.{}.tmp", hex::encode(nonce)));
        let written = write_private(&temporary, format!("{material}\n").as_bytes())
            .and_then(|()| std::fs::hard_link(&temporary, &path));
        let _ = std::fs::remove_file(&temporary);
        match written {
            Ok(()) => {
                sync_dir(data_dir).map_err(|e| data_dir_problem(&path, e))?;
                tracing::info!(path = %path.display(), "generated a new secret key");
                Ok(Self::from_material(material.as_bytes()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(None, data_dir)?
                .ok_or_else(|| key_problem(format!("{} vanished while starting", path.display()))),
            Err(e) => Err(data_dir_problem(&path, e)),
        }
    }

    /// Uses `secret_key` when given; otherwise reads `data_dir/secret.key`, or answers `None`
    /// when there is none (yet). Problems name `SECRET_KEY`.
    pub fn load(secret_key: Option<&Secret>, data_dir: &Path) -> Result<Option<Self>, ConfigError> {
        if let Some(key) = secret_key {
            return Ok(Some(Self::from_material(key.expose().as_bytes())));
        }
        let path = data_dir.join(KEY_FILE);
        let cannot_read =
            |e: std::io::Error| key_problem(format!("cannot read {}: {e}", path.display()));
        // One open file for the check, the tightening and the read: what is checked is what
        // is read, even if the path is replaced meanwhile.
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(cannot_read(e)),
        };
        let meta = file.metadata().map_err(cannot_read)?;
        tighten_key_file(&path, &file, &meta)?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).map_err(cannot_read)?;
        let material = text.trim();
        if material.len() < 32 {
            return Err(key_problem(format!(
                "key file {} holds fewer than 32 characters",
                path.display()
            )));
        }
        Ok(Some(Self::from_material(material.as_bytes())))
    }

    /// Derives every key from `material`.
    pub fn from_material(material: &[u8]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(b"zoom-integration"), material);
        let mut at_rest = [0u8; 32];
        let mut state_signing = [0u8; 32];
        let mut link_signing = [0u8; 32];
        let mut fingerprint = [0u8; 8];
        hk.expand(b"secrets at rest v1", &mut at_rest)
            .and_then(|()| hk.expand(b"oauth state v1", &mut state_signing))
            .and_then(|()| hk.expand(b"setup links v1", &mut link_signing))
            .and_then(|()| hk.expand(b"key fingerprint v1", &mut fingerprint))
            .expect("HKDF output lengths are valid");
        Self {
            at_rest: Aes256Gcm::new(&at_rest.into()),
            state_signing,
            link_signing,
            fingerprint: hex::encode(fingerprint),
        }
    }

    /// A short, non-secret name of the key, to tell whether a database was sealed with it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key that signs OAuth state.
    pub fn state_signing_key(&self) -> &[u8; 32] {
        &self.state_signing
    }

    /// The key that signs connection-setup links.
    pub fn link_signing_key(&self) -> &[u8; 32] {
        &self.link_signing
    }

    /// Encrypts `plaintext` with AES-256-GCM under a fresh random nonce. `context` (for
    /// example the variable's scope and name) is authenticated, so a sealed value moved to
    /// another place no longer opens.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let ciphertext = self
            .at_rest
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("AES-GCM encryption of a bounded value cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Opens what [`Keys::seal`] produced with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let (&version, rest) = sealed.split_first().ok_or(OpenError)?;
        if version != SEALED_V1 || rest.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError)?;
        self.at_rest
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| OpenError)
    }
}

/// Makes a key file that its group may access private again (mode 0600) when this user owns
/// it: a volume mounted with an `fsGroup` (Kubernetes) turns a 0600 file into 0660 at every
/// start. A key file that others may access is refused, as is a group-accessible one this user
/// cannot change: whoever else could read it may hold the key.
fn tighten_key_file(
    path: &Path,
    file: &std::fs::File,
    meta: &std::fs::Metadata,
) -> Result<(), ConfigError> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let refuse = |why: String| {
        Err(key_problem(format!(
            "key file {} {why}; make sure no one else has read it, then run chmod 600 on it \
             (or set SECRET_KEY)",
            path.display()
        )))
    };
    if mode & 0o007 != 0 {
        return refuse(format!("is open to other users (mode {mode:o})"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return refuse(format!(
            "is open to its group (mode {mode:o}) and owned by user {}, not by this process's \
             user {me}, so it cannot be made private",
            meta.uid()
        ));
    }
    // fchmod on the file that was checked and will be read.
    if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(0o600)) {
        return refuse(format!(
            "is open to its group (mode {mode:o}) and cannot be made private ({e})"
        ));
    }
    tracing::warn!(
        path = %path.display(),
        mode = format!("{mode:o}"),
        "the key file was open to its group; tightened it to mode 600"
    );
    Ok(())
}

/// Refuses to generate a key when the embedded database in `data_dir` remembers the one that
/// sealed its secrets: the key file was lost (or never copied with the database), and only
/// that key opens them. Nothing is written.
fn refuse_over_sealed_database(data_dir: &Path, key_file: &Path) -> Result<(), ConfigError> {
    let database = data_dir.join(crate::host::embedded::DB_FILE);
    match crate::host::embedded::stored_key_fingerprint(data_dir) {
        Ok(None) => Ok(()),
        Ok(Some(fingerprint)) => Err(key_problem(format!(
            "is not set and there is no key file {}, but the database {} holds secrets sealed \
             with a key (fingerprint {fingerprint}); restore that key file, or set SECRET_KEY \
             to that key",
            key_file.display(),
            database.display()
        ))),
        Err(e) => Err(ConfigError::new(
            "DATA_DIR",
            format!(
                "cannot read {} to tell which key sealed it: {e} (restore the key file {}, or set SECRET_KEY)",
                database.display(),
                key_file.display()
            ),
        )),
    }
}

fn key_problem(what: String) -> ConfigError {
    ConfigError::new("SECRET_KEY", what)
}

/// The key file could not be written: the data directory is at fault (a volume owned by
/// another user, say), not a key.
fn data_dir_problem(path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError::new(
        "DATA_DIR",
        format!(
            "cannot create the generated key file {}: {e} (make the directory writable, or set SECRET_KEY)",
            path.display()
        ),
    )
}

/// Creates (or truncates) `path` with mode 0600 and writes `bytes` to disk.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a new name in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let keys = Keys::from_material(b"0123456789abcdef0123456789abcdef");
        let sealed = keys.seal(b"client-secret", b"con_x\0private_client_secret");
        assert!(!sealed.windows(13).any(|w| w == b"client-secret"));
        assert_eq!(
            keys.open(&sealed, b"con_x\0private_client_secret").unwrap(),
            b"client-secret"
        );
        assert!(keys.open(&sealed, b"con_y\0private_client_secret").is_err());
        let other = Keys::from_material(b"another key material, 32 chars!!");
        assert!(
            other
                .open(&sealed, b"con_x\0private_client_secret")
                .is_err()
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(
            keys.open(&tampered, b"con_x\0private_client_secret")
                .is_err()
        );
        assert!(keys.open(&[], b"").is_err());
        assert_ne!(keys.fingerprint(), other.fingerprint());
    }

    #[test]
    fn a_generated_key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Keys::load_or_generate(None, dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Keys::load_or_generate(None, dir.path()).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
    }

    #[test]
    fn starts_racing_on_one_data_dir_all_end_up_with_the_one_key_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let barrier = std::sync::Barrier::new(8);
        let fingerprints: Vec<String> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        Keys::load_or_generate(None, dir.path())
                            .unwrap()
                            .fingerprint()
                            .to_string()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let on_disk = Keys::load(None, dir.path()).unwrap().unwrap();
        assert!(fingerprints.iter().all(|f| f == on_disk.fingerprint()));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE], "no temporary files are left");
    }

    #[test]
    fn no_key_is_generated_over_a_database_a_lost_key_sealed() {
        use crate::host::embedded::{DB_FILE, EmbeddedHost};
        let dir = tempfile::tempdir().unwrap();
        let lost = std::sync::Arc::new(Keys::from_material(b"the key that was lost, 32+ chars"));
        let host = EmbeddedHost::open(dir.path(), lost.clone()).unwrap();
        // Still open, as after a crash: the fingerprint may be in the write-ahead log only.
        let err = Keys::load_or_generate(None, dir.path()).unwrap_err();
        assert_eq!(err.variable, "SECRET_KEY", "{err}");
        assert!(err.problem.contains(lost.fingerprint()), "{err}");
        assert!(err.problem.contains("restore that key file"), "{err}");
        assert!(err.problem.contains("set SECRET_KEY"), "{err}");
        assert!(!dir.path().join(KEY_FILE).exists(), "no key file written");
        drop(host);
        let err = Keys::load_or_generate(None, dir.path()).unwrap_err();
        assert_eq!(err.variable, "SECRET_KEY", "{err}");
        assert!(!dir.path().join(KEY_FILE).exists(), "no key file written");
        // The database still opens with its own key, unchanged.
        EmbeddedHost::open(dir.path(), lost).unwrap();
        // With a remote host the database is a leftover: a key is made.
        Keys::load_or_generate_for(None, dir.path(), false).unwrap();
        assert!(dir.path().join(KEY_FILE).is_file());

        // A database that names no key yet (made empty by a start that stopped at once) is
        // no reason to refuse.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::write(fresh.path().join(DB_FILE), b"").unwrap();
        Keys::load_or_generate(None, fresh.path()).unwrap();
        assert!(fresh.path().join(KEY_FILE).is_file());
    }

    #[test]
    fn a_key_file_that_cannot_be_written_names_the_data_dir() {
        // A directory nobody can create files in, root included (tests may run as root,
        // whom a chmod does not stop).
        let err = Keys::load_or_generate(None, Path::new("/proc")).unwrap_err();
        assert_eq!(err.variable, "DATA_DIR", "{err}");
        assert!(err.problem.contains("or set SECRET_KEY"), "{err}");
    }

    #[test]
    fn an_own_key_file_open_to_the_group_is_made_private_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let generated = Keys::load_or_generate(None, dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        let material = std::fs::read_to_string(&path).unwrap();
        // What a Kubernetes fsGroup does to the volume at every start.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        let (loaded, logs) = crate::telemetry::logs_of(|| Keys::load_or_generate(None, dir.path()));
        let loaded = loaded.unwrap();
        assert_eq!(loaded.fingerprint(), generated.fingerprint());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(logs.contains("WARN"), "{logs}");
        assert!(logs.contains("tightened it to mode 600"), "{logs}");
        assert!(
            !logs.contains(material.trim()),
            "the key is never logged: {logs}"
        );
    }

    #[test]
    fn a_key_file_open_to_others_is_refused_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        Keys::load_or_generate(None, dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o604, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Keys::load_or_generate(None, dir.path()).unwrap_err();
            assert_eq!(err.variable, "SECRET_KEY");
            assert!(err.problem.contains("open to other users"), "{err}");
            assert!(err.problem.contains("chmod 600"), "{err}");
            let now = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(now, mode, "left as it is");
        }
    }

    #[test]
    fn a_key_file_open_to_the_group_that_cannot_be_made_private_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Keys::load_or_generate(None, dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        // Only root can give the file to another user; as anyone else there is nothing to try.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: only root can give the key file to another user");
            return;
        }
        std::os::unix::fs::chown(&path, Some(65_534), None).unwrap();
        let err = Keys::load_or_generate(None, dir.path()).unwrap_err();
        assert_eq!(err.variable, "SECRET_KEY");
        assert!(err.problem.contains("cannot be made private"), "{err}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "another user's file is not changed");
    }
}
