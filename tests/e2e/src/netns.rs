//! Private network namespaces, for a client whose port cannot be changed: Microsoft's Python
//! device SDK always connects to port 8883. The simulator runs in a namespace of its own
//! (only `lo`, brought up), where 8883 is surely free, and the client joins that namespace.
//! Files are shared as usual; only the network is private. Needs root (`make test` runs as
//! root); the namespace goes away with the simulator.

use std::process::Command;

/// A command prefix (for [`crate::SimOptions::wrapper`]) that runs a program in a new network
/// namespace with `lo` up. The program is exec'd, so its pid is the child's.
pub fn private() -> Vec<String> {
    [
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" \"$@\"",
    ]
    .map(String::from)
    .to_vec()
}

/// A command prefix that runs a program in the network namespace of process `pid`.
pub fn enter(pid: u32) -> Vec<String> {
    vec![
        "nsenter".into(),
        format!("--net=/proc/{pid}/ns/net"),
        "--".into(),
    ]
}

/// Fails the test with what to do when network namespaces are not available here.
pub fn require() {
    let o = Command::new("unshare")
        .args(["--net", "--", "ip", "link", "set", "lo", "up"])
        .output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "cannot make a private network namespace (unshare --net, then ip link set lo up): {}; \
             these tests run the simulator on port 8883 in a namespace of its own and need root \
             (make test runs them as root) and the iproute2 and util-linux packages",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run unshare (package util-linux): {e}"),
    }
}

/// A `Command` for `program` inside the namespace of process `pid`.
pub fn command(pid: u32, program: &std::path::Path) -> Command {
    let prefix = enter(pid);
    let mut c = Command::new(&prefix[0]);
    c.args(&prefix[1..]).arg(program);
    c
}
