//! The agent as a systemd service: readiness, stop and watchdog notifications, and a
//! socket handed over by socket activation.
//!
//! The notify protocol is one datagram of `KEY=VALUE` lines to the unix socket named
//! by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); without that
//! variable every call does nothing, so the agent runs the same outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (for example `READY=1`) to systemd, if it is listening. Failures are
/// logged, never fatal: a missed notification must not stop the agent.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, "systemd notification not sent");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// How often to send `WATCHDOG=1`: half the `WatchdogSec` systemd asked for, if it
/// asked this process.
pub fn watchdog_interval() -> Option<Duration> {
    if !for_this_process("WATCHDOG_PID") {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// `VAR` unset, or set to this process's id.
fn for_this_process(var: &str) -> bool {
    match std::env::var(var) {
        Ok(pid) => pid.parse::<u32>().ok() == Some(std::process::id()),
        Err(_) => true,
    }
}

/// The UDP socket systemd passed (socket activation, `ListenDatagram=` in barge.socket),
/// if it passed one to this process. The first passed descriptor (3) is taken.
pub fn activated_socket() -> Option<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    let pid_ok = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()? == std::process::id();
    let fds: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if !pid_ok || fds < 1 || !is_udp_socket(3) {
        return None;
    }
    // SAFETY: systemd passed descriptor 3 to this process for it to own, and it was
    // just checked to be a datagram socket; nothing else in the process uses it.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(3) };
    sock.set_nonblocking(true).ok()?;
    Some(sock)
}

fn is_udp_socket(fd: i32) -> bool {
    crate::net::quic::get_int(fd, libc::SO_TYPE).is_ok_and(|kind| kind == libc::SOCK_DGRAM as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\nSTATUS=listening").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=listening");
        assert!(send(dir.path().join("none").as_os_str(), "READY=1").is_err());
    }

    #[test]
    fn a_closed_descriptor_is_not_taken_for_a_socket() {
        assert!(!is_udp_socket(-1));
    }
}
