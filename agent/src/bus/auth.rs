//! Who may change state over D-Bus: root, the daemon's own user, and members
//! of group `dps-agent-admin`. The bus policy file says the same; this is the
//! daemon's own check (defence in depth), made from the caller's credentials
//! as the bus daemon reports them.

use std::ffi::CString;

use zbus::fdo::{DBusProxy, Error as FdoError};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::Connection;

use super::ADMIN_GROUP;

/// Checks the caller of `method`; returns a description of the caller for the
/// log, or AccessDenied with the reason.
pub async fn authorize(
    conn: &Connection,
    header: &Header<'_>,
    method: &str,
) -> Result<String, FdoError> {
    let sender = header
        .sender()
        .ok_or_else(|| FdoError::AccessDenied(format!("{method}: the call has no sender")))?;
    let dbus = DBusProxy::new(conn).await?;
    let creds = dbus
        .get_connection_credentials(BusName::from(sender.to_owned()))
        .await?;
    let uid = creds.unix_user_id().ok_or_else(|| {
        FdoError::AccessDenied(format!("{method}: the bus did not say who the caller is"))
    })?;
    let pid = creds.process_id();
    let who = match pid {
        Some(p) => format!("uid {uid} (pid {p})"),
        None => format!("uid {uid}"),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    if uid == 0 || uid == own_uid {
        return Ok(who);
    }
    let deny = |why: &str| {
        FdoError::AccessDenied(format!(
            "{method} is allowed to root and members of group {ADMIN_GROUP}; {who} {why}"
        ))
    };
    let Some(admin_gid) = group_id(ADMIN_GROUP) else {
        return Err(deny(&format!(
            "is not root, and group {ADMIN_GROUP} does not exist on this system"
        )));
    };
    // Only the bus's word counts: /proc/PID/status could belong to another
    // process by now (pid reuse), and ProtectProc=invisible hides it.
    let Some(groups) = creds.unix_group_ids() else {
        return Err(deny(
            "is not root, and the bus did not say which groups it is in (dbus-daemon 1.13+ and dbus-broker do)",
        ));
    };
    if groups.contains(&admin_gid) {
        Ok(format!("{who}, group {ADMIN_GROUP}"))
    } else {
        Err(deny("is neither"))
    }
}

/// The id of a group by name (through NSS), if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; buf outlives it; the result
    // is only read when the call reports success.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lookup() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-dps-agent-test"), None);
        assert_eq!(group_id("bad\0name"), None);
    }
}
