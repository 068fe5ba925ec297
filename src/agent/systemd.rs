//! The agent as a systemd service: readiness, reload, stop and watchdog notifications
//! (the notify protocol, by the `sd-notify` crate), and a socket handed over by socket
//! activation.
//!
//! Without `NOTIFY_SOCKET`, `WATCHDOG_USEC` or `LISTEN_FDS` in its environment every
//! call here does nothing, so the agent runs the same outside systemd.

use std::time::Duration;

pub use sd_notify::NotifyState;

/// Sends `states` (for example [`NotifyState::Ready`]) to systemd, if it is listening.
/// Failures are logged, never fatal: a missed notification must not stop the agent.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "systemd notification not sent");
    }
}

/// Tells systemd the agent is re-reading its config (with the clock reading that
/// `Type=notify-reload` asks for); send [`NotifyState::Ready`] when done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// How often to send [`NotifyState::Watchdog`]: half the `WatchdogSec` systemd asked
/// this process for.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

/// The UDP socket systemd passed (socket activation, `ListenDatagram=` in barge.socket),
/// if it passed one to this process. The first passed descriptor is taken.
pub fn activated_socket() -> Option<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    let fd = sd_notify::listen_fds().ok()?.next()?;
    if !is_udp_socket(fd) {
        return None;
    }
    // SAFETY: systemd passed this descriptor to this process for it to own, and it
    // was just checked to be a datagram socket; nothing else in the process uses it.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
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
    fn a_closed_descriptor_is_not_taken_for_a_socket() {
        assert!(!is_udp_socket(-1));
    }
}
