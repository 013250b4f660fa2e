//! The driver behind an interface (`ethtool -i`), which decides the attach mode `mode = "auto"`
//! picks: a virtual device (no bus behind it: veth, loopback, bridge...) gets the tc program,
//! since its XDP modes copy every TCP packet (`attach`).
use std::{ffi::c_void, io, os::fd::FromRawFd as _, os::fd::OwnedFd};

/// `ETHTOOL_GDRVINFO`, from linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo`, of which `driver` and `bus_info` are read.
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

/// What `ethtool -i` says of an interface.
#[derive(Debug, PartialEq, Eq)]
pub struct DriverInfo {
    /// "veth", "mlx5_core", ...
    pub driver: String,
    /// The device's bus address ("0000:03:00.0"); empty or "N/A" for a virtual device.
    pub bus: String,
}

impl DriverInfo {
    /// Whether no hardware is behind the interface: its packets are socket buffers already.
    pub fn is_virtual(&self) -> bool {
        self.bus.is_empty() || self.bus == "N/A"
    }
}

/// Whether `iface` is a virtual device; so is one whose driver does not answer (loopback).
pub fn is_virtual(iface: &str) -> bool {
    driver(iface).map_or(true, |info| info.is_virtual())
}

/// `iface`'s driver and bus, as `ethtool -i` prints them.
pub fn driver(iface: &str) -> io::Result<DriverInfo> {
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
    Ok(DriverInfo {
        driver: c_string(&info.driver),
        bus: c_string(&info.bus_info),
    })
}

fn c_string(bytes: &[u8]) -> String {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..len]).into_owned()
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
    fn loopback_is_virtual() {
        assert!(is_virtual("lo"));
    }

    #[test]
    fn a_device_without_a_bus_is_virtual() {
        let veth = DriverInfo {
            driver: "veth".into(),
            bus: String::new(),
        };
        let bridge = DriverInfo {
            driver: "bridge".into(),
            bus: "N/A".into(),
        };
        let nic = DriverInfo {
            driver: "mlx5_core".into(),
            bus: "0000:03:00.0".into(),
        };
        assert!(veth.is_virtual() && bridge.is_virtual());
        assert!(!nic.is_virtual());
    }

    #[test]
    fn a_name_too_long_for_ifreq_is_refused() {
        let err = driver("a-name-longer-than-ifnamsiz").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
