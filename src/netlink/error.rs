//! Errors of the netlink layer. A kernel refusal keeps its errno and its extended-ack text, so the
//! operator reads the kernel's own reason ("TC classifier not found", "HTB class in use").

use std::fmt;

pub use crate::model::DecodeError;

/// The kernel's answer to one request that it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    /// Positive errno value (ENOENT = 2, ...).
    pub errno: i32,
    /// The extended-ack message, when the kernel gave one.
    pub message: Option<String>,
}

impl KernelError {
    pub fn errno_name(&self) -> &'static str {
        errno_name(self.errno)
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.errno);
        if self.errno == libc::EPERM {
            return write!(
                f,
                "not permitted (EPERM): changing traffic control needs root (CAP_NET_ADMIN)"
            );
        }
        match &self.message {
            Some(m) => write!(
                f,
                "{m} ({}: {})",
                self.errno_name(),
                strip_os_suffix(&text.to_string())
            ),
            None => write!(
                f,
                "{} ({})",
                strip_os_suffix(&text.to_string()),
                self.errno_name()
            ),
        }
    }
}

fn strip_os_suffix(s: &str) -> &str {
    s.split(" (os error").next().unwrap_or(s)
}

/// The symbolic name of the errno values the tc and link paths meet.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::E2BIG => "E2BIG",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOBUFS => "ENOBUFS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        _ => "errno",
    }
}

/// Everything that can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{operation}: {error}")]
    Kernel {
        operation: String,
        error: KernelError,
    },
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("network namespace {name:?}: {reason}")]
    Namespace { name: String, reason: String },
    #[error("no network device named {0:?}")]
    NoSuchDevice(String),
    #[error("the kernel lacks {feature}: {detail}")]
    MissingFeature {
        feature: &'static str,
        detail: String,
    },
    #[error("{0}")]
    Protocol(String),
}

impl NetlinkError {
    /// The kernel error behind this failure, if the kernel refused a request.
    pub fn kernel(&self) -> Option<&KernelError> {
        match self {
            NetlinkError::Kernel { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_error_reads_like_the_kernel() {
        let e = KernelError {
            errno: libc::ENOENT,
            message: Some("TC classifier not found".into()),
        };
        assert_eq!(
            e.to_string(),
            "TC classifier not found (ENOENT: No such file or directory)"
        );
        let e = KernelError {
            errno: libc::EBUSY,
            message: None,
        };
        assert_eq!(e.to_string(), "Device or resource busy (EBUSY)");
    }
}
