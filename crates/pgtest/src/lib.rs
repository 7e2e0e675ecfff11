//! A throwaway PostgreSQL cluster for tests and the benchmark.
//!
//! [`TempPostgres::start`] finds the installed server binaries, runs `initdb`
//! in a fresh temporary folder, starts `postgres` on a free port of 127.0.0.1
//! (and a private Unix socket folder), and stops the server and removes the
//! folder when dropped. Tests that need PostgreSQL call it and *fail* with a
//! clear message if no PostgreSQL is installed; they never pass silently.
//!
//! Where the binaries are looked for, in order: `$KOPIR_PG_BINDIR`, the folder
//! `pg_config --bindir` names, the newest `/usr/lib/postgresql/*/bin`, and
//! `PATH`. On Debian the package `postgresql` (which pulls in
//! `postgresql-15` on bookworm) provides them; its own cluster need not run.
//!
//! PostgreSQL refuses to run as root. When this process runs as root, the
//! folder is given to the `postgres` user (or `$KOPIR_PG_USER`) and
//! `initdb`, `pg_ctl` run through `runuser -u postgres --` (or `su`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

/// Why a throwaway cluster could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgTestError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: looked in {0}; \
         install PostgreSQL (Debian: `apt-get install postgresql`) or set KOPIR_PG_BINDIR"
    )]
    NotInstalled(String),
    /// Running as root, and no unprivileged user to run PostgreSQL as.
    #[error("running as root and there is no `{0}` user to run PostgreSQL as (set KOPIR_PG_USER)")]
    NoUser(String),
    /// A command failed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (and the server log, if any).
        output: String,
    },
    /// A file-system or process error.
    #[error("{0}")]
    Io(String),
    /// Creating a database failed.
    #[error("cannot create a test database: {0}")]
    Database(String),
}

/// A running throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct TempPostgres {
    dir: Option<tempfile::TempDir>,
    bindir: PathBuf,
    run_as: Option<String>,
    port: u16,
}

static SHARED: Mutex<Weak<TempPostgres>> = Mutex::new(Weak::new());
static DATABASES: AtomicU32 = AtomicU32::new(0);

fn io(what: &str) -> impl Fn(std::io::Error) -> PgTestError + '_ {
    move |e| PgTestError::Io(format!("{what}: {e}"))
}

/// The folder with `initdb`, `pg_ctl` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, PgTestError> {
    let has_all = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    let mut looked = Vec::new();
    if let Some(dir) = std::env::var_os("KOPIR_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_all(&dir) {
            return Ok(dir);
        }
        looked.push(dir.display().to_string());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_all(&dir) {
            return Ok(dir);
        }
        looked.push(dir.display().to_string());
    } else {
        looked.push("pg_config --bindir (no pg_config)".into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.into_iter().rev().find(|(_, d)| has_all(d)) {
        return Ok(dir);
    }
    looked.push("/usr/lib/postgresql/*/bin".into());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_all(&dir) {
                return Ok(dir);
            }
        }
    }
    looked.push("PATH".into());
    Err(PgTestError::NotInstalled(looked.join(", ")))
}

/// The effective user id of this process (Linux: from /proc; else `id -u`).
fn euid() -> Option<u32> {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                return rest.split_whitespace().nth(1)?.parse().ok();
            }
        }
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn id_of(user: &str, flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn free_port() -> Result<u16, PgTestError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("read the bound port"))?
        .port())
}

fn has_runuser() -> bool {
    Command::new("runuser")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl TempPostgres {
    /// Starts a fresh cluster (takes a second or two).
    pub fn start() -> Result<Self, PgTestError> {
        let bindir = find_bindir()?;
        let root = euid() == Some(0);
        let run_as = if root {
            let user = std::env::var("KOPIR_PG_USER").unwrap_or_else(|_| "postgres".into());
            Some(user)
        } else {
            None
        };
        // As root, the folder must be reachable by the unprivileged user:
        // /tmp is, whatever TMPDIR says.
        let base = if root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("kopir-pg-")
            .tempdir_in(&base)
            .map_err(io("create a temporary folder"))?;
        if let Some(user) = &run_as {
            let uid = id_of(user, "-u").ok_or_else(|| PgTestError::NoUser(user.clone()))?;
            let gid = id_of(user, "-g").ok_or_else(|| PgTestError::NoUser(user.clone()))?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io("give the temporary folder to the PostgreSQL user"))?;
        }
        let mut pg = Self {
            dir: Some(dir),
            bindir,
            run_as,
            port: 0,
        };
        pg.initdb()?;
        let mut last = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| PgTestError::Io("postgres did not start".into())))
    }

    /// A cluster shared by everyone in this process who holds it; it stops
    /// when the last holder drops it (the next caller then starts a new one).
    pub fn shared() -> Result<Arc<Self>, PgTestError> {
        let mut slot = SHARED
            .lock()
            .map_err(|_| PgTestError::Io("shared cluster lock poisoned".into()))?;
        if let Some(pg) = slot.upgrade() {
            return Ok(pg);
        }
        let pg = Arc::new(Self::start()?);
        *slot = Arc::downgrade(&pg);
        Ok(pg)
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/"))
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.path().join("server.log")
    }

    fn socket_dir(&self) -> PathBuf {
        self.path().join("sock")
    }

    /// Runs a server binary, as the PostgreSQL user when we are root.
    fn run(&self, binary: &str, args: &[String]) -> Result<Output, PgTestError> {
        let exe = self.bindir.join(binary);
        let mut cmd = match &self.run_as {
            Some(user) if has_runuser() => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe).args(args);
                c
            }
            Some(user) => {
                let line = std::iter::once(exe.display().to_string())
                    .chain(args.iter().cloned())
                    .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut c = Command::new("su");
                c.args([user.as_str(), "-s", "/bin/sh", "-c", &line]);
                c
            }
            None => {
                let mut c = Command::new(&exe);
                c.args(args);
                c
            }
        };
        cmd.current_dir(self.path());
        let command = format!("{binary} {}", args.join(" "));
        let out = cmd.output().map_err(io(&command))?;
        if out.status.success() {
            return Ok(out);
        }
        let mut output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(log) = std::fs::read_to_string(self.log()) {
            output.push_str("\nserver log:\n");
            output.push_str(&log);
        }
        Err(PgTestError::Command {
            command,
            status: out.status.to_string(),
            output,
        })
    }

    fn initdb(&self) -> Result<(), PgTestError> {
        let sock = self.socket_dir();
        std::fs::create_dir(&sock).map_err(io("create the socket folder"))?;
        if let Some(user) = &self.run_as
            && let (Some(uid), Some(gid)) = (id_of(user, "-u"), id_of(user, "-g"))
        {
            std::os::unix::fs::chown(&sock, Some(uid), Some(gid))
                .map_err(io("give the socket folder to the PostgreSQL user"))?;
        }
        self.run(
            "initdb",
            &[
                "-D".into(),
                self.data().display().to_string(),
                "-U".into(),
                "postgres".into(),
                "--auth=trust".into(),
                "-E".into(),
                "UTF8".into(),
                "--locale=C".into(),
                "--no-sync".into(),
                "--no-instructions".into(),
            ],
        )?;
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), PgTestError> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=128MB",
            self.port,
            self.socket_dir().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D".into(),
                self.data().display().to_string(),
                "-l".into(),
                self.log().display().to_string(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-o".into(),
                options,
                "start".into(),
            ],
        )?;
        Ok(())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn create_database(&self) -> Result<String, PgTestError> {
        let n = DATABASES.fetch_add(1, Ordering::SeqCst);
        let name = format!("kopir_{}_{n}", std::process::id());
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(|e| PgTestError::Database(e.to_string()))?;
        let task = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| PgTestError::Database(e.to_string()))?;
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        Ok(self.url(&name))
    }

    fn stop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        let _ = self.run(
            "pg_ctl",
            &[
                "-D".into(),
                self.data().display().to_string(),
                "-m".into(),
                "immediate".into(),
                "-w".into(),
                "stop".into(),
            ],
        );
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}
