//! The driver behind an interface (`ethtool -i`'s "driver"), which decides the attach mode
//! `mode = "auto"` picks: native XDP on a veth costs more than generic (`attach`).
use std::{ffi::c_void, io, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// `ETHTOOL_GDRVINFO`, from linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo`, of which only `driver` is read.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const _: () = assert!(std::mem::size_of::<DrvInfo>() == 196);

/// `struct ifreq` with its union as `ifr_data`, padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut c_void,
    _pad: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// The name of `iface`'s driver ("veth", "mlx5_core", ...), as `ethtool -i` prints it.
pub fn driver(iface: &str) -> io::Result<String> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: std::ptr::null_mut(),
        _pad: [0; 16],
    };
    if iface.len() >= req.name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: all-zero is a valid DrvInfo (integers and byte arrays).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    req.data = (&raw mut info).cast();
    // SAFETY: socket(2) has no memory preconditions; a valid fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `req` and the `info` it points to live across the call and have the layouts
    // SIOCETHTOOL's ETHTOOL_GDRVINFO reads and writes.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCETHTOOL,
            &raw mut req,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_that_does_not_exist_is_an_error() {
        let err = driver("pxnosuchif0").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
    }

    #[test]
    fn a_name_too_long_for_ifreq_is_refused() {
        let err = driver("a-name-longer-than-ifnamsiz").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
