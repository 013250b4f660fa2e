//! The runtime socket's owner and group, named as `chown` takes them: a name from the host's
//! user and group databases, or a number.
use std::ffi::CString;

/// The uid of user `name` (or of a number), or why there is none.
pub(crate) fn user_id(name: &str) -> Result<u32, String> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let c = CString::new(name).map_err(|_| format!("user {name:?} contains a NUL byte"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed passwd is a valid out-value; buf outlives the call and its length is given.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no user named {name:?} on this host"));
    }
    Ok(pwd.pw_uid)
}

/// The gid of group `name` (or of a number), or why there is none.
pub(crate) fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| format!("group {name:?} contains a NUL byte"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in `user_id`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group named {name:?} on this host"));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        assert_eq!(user_id("root"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        assert_eq!(user_id("1234"), Ok(1234));
        assert!(
            user_id("no-such-user-patroxy")
                .unwrap_err()
                .contains("no user named")
        );
        assert!(group_id("no-such-group-patroxy").is_err());
    }
}
