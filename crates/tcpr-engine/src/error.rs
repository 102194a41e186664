use std::io;
use std::net::SocketAddr;

/// What went wrong in the engine. Variants keep apart the kernel refusing,
/// a bad image, missing privileges and caller misuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("cannot {what}: {source}")]
    Kernel {
        /// What tcpr was doing.
        what: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// A privilege is missing.
    #[error("{0}")]
    Permission(String),
    /// The fd is not a TCP socket.
    #[error("{0}")]
    NotTcp(String),
    /// The socket is in a state repair mode cannot carry.
    #[error("cannot freeze a socket in state {state}: only ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and CLOSING can be moved")]
    UnsupportedState {
        /// The kernel's name of the state.
        state: &'static str,
    },
    /// The connection's 4-tuple is taken on this host.
    #[error("cannot restore {local} -> {peer}: this connection's address pair is already in use on this host")]
    AddressInUse {
        /// Our side.
        local: SocketAddr,
        /// The peer.
        peer: SocketAddr,
    },
    /// The process does not exist.
    #[error("no process with pid {0}")]
    NoSuchProcess(i32),
    /// The process has no such fd.
    #[error("process {pid} has no open file descriptor {fd}")]
    NoSuchFd {
        /// The process.
        pid: i32,
        /// The fd number.
        fd: i32,
    },
    /// The image is unusable.
    #[error("bad image: {0}")]
    BadImage(#[from] tcpr_image::ImageError),
    /// The flow lock could not be set or cleared.
    #[error("flow lock: {0}")]
    Lock(String),
    /// An address, interface or route asked for is not on this host.
    #[error("{0}")]
    NotFound(String),
    /// The socket changed under us, or the kernel answered inconsistently.
    #[error("{0}")]
    Inconsistent(String),
    /// The socket is in repair mode already: frozen by an earlier dump or
    /// move, and perhaps restored elsewhere since.
    #[error("{flow} is frozen already (an earlier dump or move froze it, and it may live on elsewhere): freezing it again could move one connection twice")]
    AlreadyFrozen {
        /// The frozen flow.
        flow: crate::Flow,
    },
    /// The socket is not frozen (not in repair mode) and not locked.
    #[error("{flow} is not frozen")]
    NotFrozen {
        /// The flow.
        flow: crate::Flow,
    },
    /// The sockets of one freeze belong to different network namespaces.
    #[error("the sockets to freeze belong to different network namespaces ({other} is not in the first socket's): freeze each namespace's sockets in a call of its own")]
    MixedNamespaces {
        /// A flow outside the first socket's namespace.
        other: crate::Flow,
    },
    /// A lock lease outside what the lock takes.
    #[error("a lock lease must be at least 1 ms and at most {} s, not {lease:?}", max.as_secs())]
    LeaseOutOfRange {
        /// The lease asked for.
        lease: std::time::Duration,
        /// The longest lease.
        max: std::time::Duration,
    },
    /// A restored connection's unsent data could not all be queued: the
    /// buffer this namespace allows was full and the peer did not
    /// acknowledge enough in time. The restored socket was discarded
    /// without a FIN or RST.
    #[error("cannot restore {local} -> {peer}: only {queued} of {unsent} unsent bytes could be queued within {waited:?} (the send buffer is full and the peer is not acknowledging); the restored socket was discarded without a FIN or RST")]
    UnsentNotQueued {
        /// Our side.
        local: SocketAddr,
        /// The peer.
        peer: SocketAddr,
        /// Bytes queued before giving up.
        queued: usize,
        /// Bytes there were to queue.
        unsent: usize,
        /// How long restore waited for the peer.
        waited: std::time::Duration,
    },
}

/// What a refused (EPERM) operation needs, so that the message names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// CAP_NET_ADMIN in the user namespace that owns the network namespace:
    /// repair mode, routes and rules, nftables, SO_MARK.
    NetAdmin,
    /// CAP_NET_RAW over the network namespace: raw sockets.
    NetRaw,
}

impl Need {
    fn explain(self) -> &'static str {
        match self {
            Need::NetAdmin => "CAP_NET_ADMIN over the socket's network namespace is needed",
            Need::NetRaw => "CAP_NET_RAW over the network namespace is needed to send a raw packet",
        }
    }
}

impl Error {
    /// A kernel error while doing `what`, an operation on a socket or on
    /// the network namespace's configuration (repair mode, socket options,
    /// routes, nftables): an EPERM becomes [`Error::Permission`] naming
    /// CAP_NET_ADMIN. For an operation that needs something else, the
    /// engine uses `Error::kernel_needing`, which names the need.
    pub fn kernel(what: impl Into<String>, source: io::Error) -> Error {
        Error::kernel_needing(what, Need::NetAdmin, source)
    }

    /// A kernel error while doing `what`, an operation that needs `need`:
    /// an EPERM (or EACCES, which raw sockets answer) becomes
    /// [`Error::Permission`] naming it.
    pub(crate) fn kernel_needing(what: impl Into<String>, need: Need, source: io::Error) -> Error {
        let what = what.into();
        let refused = match crate::sys::raw_os_error(&source) {
            Some(libc::EPERM) => true,
            Some(libc::EACCES) => need != Need::NetAdmin,
            _ => false,
        };
        if refused {
            return Error::Permission(format!(
                "cannot {what}: operation not permitted ({})",
                need.explain()
            ));
        }
        Error::Kernel { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> io::Error {
        io::Error::from_raw_os_error(libc::EPERM)
    }

    #[test]
    fn a_refusal_names_what_the_operation_needs() {
        let repair = Error::kernel("turn on repair mode", refused()).to_string();
        assert!(repair.contains("CAP_NET_ADMIN"), "{repair}");
        let raw = Error::kernel_needing("send a raw packet", Need::NetRaw, refused()).to_string();
        assert!(
            raw.contains("CAP_NET_RAW") && !raw.contains("CAP_NET_ADMIN"),
            "{raw}"
        );
        // Raw sockets answer EACCES too.
        let raw = Error::kernel_needing(
            "send a raw packet",
            Need::NetRaw,
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(raw, Error::Permission(_)), "{raw}");
        let other = Error::kernel("bind", io::Error::from_raw_os_error(libc::EINVAL));
        assert!(matches!(other, Error::Kernel { .. }), "{other}");
    }
}
