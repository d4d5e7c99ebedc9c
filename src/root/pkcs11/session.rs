//! Token plumbing: one initialised PKCS#11 context per module per process, the PIN, and a
//! small pool of logged-in sessions. PKCS#11 sessions must not be used from two threads
//! at once, so each blocking call borrows a session for its duration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::Config;
use crate::root::{ErrorKind, RootError};

/// Most sessions one root key keeps open (and most token calls it runs at once).
pub(super) const MAX_SESSIONS: usize = 4;

/// Modules already loaded and initialised. C_Initialize may run only once per process per
/// module (SoftHSM reads its config then), so every root key on a module shares one context.
static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The initialised context of the module at `module`, loading it on first use.
pub(crate) fn context(module: &Path) -> Result<Pkcs11, RootError> {
    let shown = module.display();
    let canonical = module.canonicalize().map_err(|e| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot find PKCS#11 module {shown}: {e}"),
        )
    })?;
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = modules.get(&canonical) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot load PKCS#11 module {shown}: {e}"),
        )
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Someone else in this process (another library) initialised it first: share it.
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                format!("cannot initialise PKCS#11 module {shown}: {}", describe(&e)),
            ));
        }
    }
    modules.insert(canonical, ctx.clone());
    Ok(ctx)
}

/// Reads the user PIN from `pin_file` or `pin_env`. The value never appears in messages.
pub(super) fn read_pin(config: &Config) -> Result<SecretString, RootError> {
    let text = match (&config.pin_file, &config.pin_env) {
        (Some(path), _) => read_pin_file(path)?,
        (None, Some(var)) => Zeroizing::new(std::env::var(var).map_err(|_| {
            RootError::new(
                ErrorKind::Misconfigured,
                format!("environment variable {var} (pin_env) is not set or not UTF-8"),
            )
        })?),
        (None, None) => {
            return Err(RootError::new(
                ErrorKind::Misconfigured,
                "a pkcs11 key needs pin_file or pin_env",
            ));
        }
    };
    // Files written by `echo` end in a newline that is not part of the PIN.
    let pin = text.strip_suffix('\n').unwrap_or(&text);
    let pin = pin.strip_suffix('\r').unwrap_or(pin);
    if pin.is_empty() {
        return Err(RootError::new(
            ErrorKind::Misconfigured,
            format!("the PIN for {} is empty", config.token_name()),
        ));
    }
    Ok(SecretString::from(pin))
}

/// Longest PIN file read (a PIN is at most a few dozen bytes).
const MAX_PIN_FILE_LEN: u64 = 4096;

/// Reads a PIN file that no other user can have changed (see [`crate::secure_path`]).
fn read_pin_file(path: &Path) -> Result<Zeroizing<String>, RootError> {
    let shown = path.display();
    let cannot = |e: std::io::Error| {
        RootError::new(
            ErrorKind::Misconfigured,
            format!("cannot read PIN file {shown}: {e}"),
        )
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    crate::secure_path::check_file(path, &meta, "PIN file")
        .map_err(|e| RootError::new(ErrorKind::Misconfigured, e))?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o044 != 0 {
        // Read at every open, reload and session recovery: say it once per file.
        static WARNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
        if !warned.iter().any(|p| p == path) {
            warned.push(path.to_path_buf());
            tracing::warn!(path = %shown, "PIN file is readable by group or others; `chmod 600` it");
        }
    }
    // Reserved up front and read through a bound, so no reallocation leaves PIN bytes behind.
    let mut text = Zeroizing::new(String::with_capacity(MAX_PIN_FILE_LEN as usize));
    std::io::Read::read_to_string(
        &mut std::io::Read::take(&mut file, MAX_PIN_FILE_LEN),
        &mut text,
    )
    .map_err(cannot)?;
    Ok(text)
}

/// A token: where it is, how to log in, and the idle logged-in sessions.
pub(super) struct Token {
    ctx: Pkcs11,
    config: Config,
    pin: SecretString,
    idle: Mutex<Vec<Session>>,
}

impl Token {
    /// Loads the module and finds the token; no session yet.
    pub(super) fn new(config: &Config) -> Result<Self, RootError> {
        let pin = read_pin(config)?;
        let ctx = context(&config.module)?;
        Ok(Self {
            ctx,
            config: config.clone(),
            pin,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// "token \"kms\"", for messages.
    pub(super) fn name(&self) -> String {
        self.config.token_name()
    }

    pub(super) fn config(&self) -> &Config {
        &self.config
    }

    /// The slot holding the configured token. Looked up again on every new session, since a
    /// re-inserted token may come back in another slot.
    fn slot(&self) -> Result<Slot, RootError> {
        let slots = self.ctx.get_slots_with_token().map_err(|e| {
            RootError::new(
                ErrorKind::Unavailable,
                format!("cannot list PKCS#11 slots: {}", describe(&e)),
            )
        })?;
        match (&self.config.token_label, self.config.slot) {
            (Some(label), _) => {
                let (mut matches, mut seen, mut unreadable) = (Vec::new(), Vec::new(), 0);
                for slot in slots {
                    match self.ctx.get_token_info(slot) {
                        Ok(info) if info.label().trim_end() == label => matches.push(slot),
                        Ok(info) => seen.push(format!("\"{}\"", info.label().trim_end())),
                        Err(_) => unreadable += 1,
                    }
                }
                // Two tokens with one label (a repeated `--init-token`) would let a restart,
                // or a new session after a re-insert, pick the other one, whose key cannot
                // unwrap what this one wrapped: refuse rather than choose.
                match matches.as_slice() {
                    [slot] => return Ok(*slot),
                    [_, _, ..] => {
                        let ids: Vec<String> = matches.iter().map(|s| s.id().to_string()).collect();
                        return Err(RootError::new(
                            ErrorKind::Misconfigured,
                            format!(
                                "{} tokens are labelled \"{label}\" in PKCS#11 module {} (slots {}): give the `slot` of the one that holds the key instead of token_label, or relabel the others",
                                matches.len(),
                                self.config.module.display(),
                                ids.join(", ")
                            ),
                        ));
                    }
                    [] => {}
                }
                if unreadable > 0 {
                    seen.push(format!("{unreadable} that could not be read"));
                }
                Err(RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "no token labelled \"{label}\" in PKCS#11 module {} (tokens present: {})",
                        self.config.module.display(),
                        if seen.is_empty() {
                            "none".to_string()
                        } else {
                            seen.join(", ")
                        }
                    ),
                ))
            }
            (None, Some(id)) => slots.into_iter().find(|s| s.id() == id).ok_or_else(|| {
                RootError::new(
                    ErrorKind::Misconfigured,
                    format!(
                        "no token in slot {id} of PKCS#11 module {}",
                        self.config.module.display()
                    ),
                )
            }),
            (None, None) => Err(RootError::new(
                ErrorKind::Misconfigured,
                "a pkcs11 key needs token_label or slot",
            )),
        }
    }

    /// Opens a read-write session and logs the user in. Errors are start-up wording
    /// (`Config`); callers at run time turn them into `Unavailable` or `Rejected`.
    pub(super) fn open_session(&self) -> Result<Session, RootError> {
        let slot = self.slot()?;
        let session = self.ctx.open_rw_session(slot).map_err(|e| {
            RootError::new(
                ErrorKind::Unavailable,
                format!("cannot open a session on {}: {}", self.name(), describe(&e)),
            )
        })?;
        match session.login(UserType::User, Some(&self.pin)) {
            // Login state is per application: a second session finds it logged in already.
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(Error::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => Err(RootError::new(
                ErrorKind::CredentialsRejected,
                format!("PIN rejected by {}", self.name()),
            )),
            Err(Error::Pkcs11(RvError::PinLocked, _)) => Err(RootError::new(
                ErrorKind::CredentialsRejected,
                format!(
                    "the user PIN of {} is locked (too many wrong attempts); the security officer must reset it",
                    self.name()
                ),
            )),
            Err(Error::Pkcs11(RvError::PinExpired, _)) => Err(RootError::new(
                ErrorKind::CredentialsRejected,
                format!("the user PIN of {} has expired; set a new one", self.name()),
            )),
            Err(Error::Pkcs11(RvError::UserPinNotInitialized, _)) => Err(RootError::new(
                ErrorKind::CredentialsRejected,
                format!(
                    "{} has no user PIN set (initialise it with softhsm2-util --init-token or the HSM's tools)",
                    self.name()
                ),
            )),
            Err(e) => Err(RootError::new(
                ErrorKind::Unavailable,
                format!("cannot log in to {}: {}", self.name(), describe(&e)),
            )),
        }
    }

    /// An idle session, or a new one if none is idle.
    pub(super) fn take(&self) -> Result<Session, RootError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(session) => Ok(session),
            None => self.open_session(),
        }
    }

    /// Returns a healthy session to the pool.
    pub(super) fn put(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_SESSIONS {
            idle.push(session);
        }
    }

    /// Drops every idle session: after one was lost, the others likely were too.
    pub(super) fn clear(&self) {
        let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(stale);
    }
}

/// True for errors after which the session (or the token behind it) is gone, but a new
/// session may work: the token was re-inserted, the HSM restarted, the login was lost.
pub(super) fn is_session_lost(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// A short description of a cryptoki error: the CKR name and the function, not the
/// paragraph of the PKCS#11 specification that its Display prints.
pub(super) fn describe(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}
