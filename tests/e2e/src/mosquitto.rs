//! A real mosquitto broker with mutual TLS on a free loopback port: an
//! independent TLS stack that checks the agent's client certificate and the
//! key behind it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto requiring a client certificate issued under `cafile`
    /// (which must reach a self-signed root: OpenSSL does not accept partial
    /// chains), serving `certfile`/`keyfile`.
    pub fn start(dir: &Path, cafile: &Path, certfile: &Path, keyfile: &Path) -> Mosquitto {
        fs::create_dir_all(dir).expect("mosquitto dir");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            let conf = dir.join("mosquitto.conf");
            let log = dir.join("mosquitto.log");
            fs::write(
                &conf,
                format!(
                    "per_listener_settings true\nuser root\nlog_dest file {log}\nlog_type all\n\
                     listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
                     require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
                    log = log.display(),
                    ca = cafile.display(),
                    cert = certfile.display(),
                    key = keyfile.display()
                ),
            )
            .expect("mosquitto.conf");
            let out = fs::File::create(dir.join("mosquitto.out")).expect("mosquitto output");
            let mut child = Command::new("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::from(out.try_clone().expect("fd")))
                .stderr(Stdio::from(out))
                .spawn()
                .expect("start mosquitto (package mosquitto)");
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken after all: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Mosquitto { child, port, log };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start");
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
