//! Process hardening at the start of `serve`: no core dumps, no ptrace by other users.
//!
//! PR_SET_DUMPABLE 0 makes the kernel write no core dump at all (whatever
//! `fs.suid_dumpable` says), hands /proc/PID/{mem,environ,maps,...} to root, and refuses
//! ptrace attaches from processes without CAP_SYS_PTRACE, even under the same uid.
//! RLIMIT_CORE 0 is the second lock, for a core_pattern that honours it.
//! Key material is not mlock'ed one key at a time: see the README's security section.

use std::io;

/// Makes the process non-dumpable and sets its core size limit to 0.
#[allow(unsafe_code)] // setrlimit(2) and prctl(2), see SAFETY
pub fn harden() -> io::Result<()> {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid, initialized rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the process is dumpable (PR_GET_DUMPABLE).
#[allow(unsafe_code)] // prctl(2), see SAFETY
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)] // getrlimit(2), see SAFETY
    fn harden_disables_dumps_and_cores() {
        // Runs in the test process; being non-dumpable harms no other test.
        harden().expect("harden");
        assert!(!is_dumpable());
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: getrlimit writes into a valid rlimit struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
    }
}
