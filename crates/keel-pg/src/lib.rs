//! A private PostgreSQL cluster owned by this process.
//!
//! [`Cluster::start`] finds the machine's PostgreSQL server binaries, creates the cluster on first use
//! (`initdb`), and runs `postgres` as a child of a supervisor thread. The child is told by the kernel
//! to shut down fast if this process dies (`PR_SET_PDEATHSIG`), so a crashed or killed owner never
//! leaves an orphaned server holding the data directory. It runs in a process group of its own, so a
//! terminal's Ctrl-C reaches only the owner, which stops the server when it is done with it. [`Cluster::stop`] asks for a fast shutdown
//! (SIGINT: clients disconnected, a checkpoint written), so the next start needs no crash recovery.
//!
//! PostgreSQL refuses to run as root; as root, the cluster runs as an unprivileged OS user
//! ([`OsUser::unprivileged`]) that owns the cluster directory. The classic traps are checked up front
//! with errors that say what to change: a directory that user cannot reach, a socket path longer than
//! the kernel allows, a stale `postmaster.pid` left by a crash.
//!
//! A cluster may instead be a hot standby of another ([`ClusterSpec::standby_of`]): a read-only copy
//! that streams the primary's write-ahead log and replays it, answering queries as it goes. On first
//! start it is copied from the primary with `pg_basebackup` (into a directory beside its own, renamed
//! into place once complete, so a copy cut short is never mistaken for a cluster); later starts
//! resume streaming from where its data left off. It streams through a physical replication slot on
//! the primary, which keeps the WAL the standby has not yet received, however long it is down (the
//! price: a slot nobody uses any more keeps WAL on the primary for ever, so its owner must drop it).
//! It sends hot-standby feedback, so the primary's vacuum keeps the row versions its queries still
//! read, rather than replay cancelling those queries.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The longest socket path the kernel accepts (`sun_path` is 108 bytes with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no PostgreSQL server binaries found: looked for `postgres` and `initdb` on PATH and in \
         /usr/lib/postgresql/*/bin and /usr/local/pgsql/bin; install them (Debian: apt-get install postgresql)"
    )]
    BinariesNotFound,
    #[error("running as root, and no unprivileged user to run PostgreSQL as: create one (useradd postgres)")]
    NoUnprivilegedUser,
    #[error(
        "PostgreSQL runs as user `{user}`, which cannot reach {dir}: run `chmod o+x {dir}`, \
         or choose a data directory outside it"
    )]
    Unreachable { user: String, dir: PathBuf },
    #[error(
        "the socket path {path} is {len} bytes, longer than the {MAX_SOCKET_PATH} the kernel allows: \
         choose a shorter socket directory"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("another PostgreSQL server (pid {pid}) is running on {dir}: stop it first (pg_ctl stop -D {dir})")]
    AlreadyRunning { pid: i32, dir: PathBuf },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL did not accept connections within {0:?}; see its log at {1}")]
    StartTimeout(Duration, PathBuf),
    #[error("PostgreSQL exited during start-up; see its log at {0}")]
    ExitedDuringStart(PathBuf),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The directory holding `postgres`, `initdb` and `pg_isready`.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// PATH first, then Debian's versioned folders (newest version first), then the source-build default.
    pub fn find() -> Result<Binaries, Error> {
        let mut candidates: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        debian.sort_by_key(|d| std::cmp::Reverse(d.0));
        candidates.extend(debian.into_iter().map(|(_, p)| p));
        candidates.push(PathBuf::from("/usr/local/pgsql/bin"));
        // A folder may hold links to some of the programs only (`/usr/local/bin/postgres` linked to
        // Debian's folder, say): follow the link to the folder that has them all.
        candidates
            .into_iter()
            .filter_map(|d| d.join("postgres").canonicalize().ok()?.parent().map(Path::to_path_buf))
            .find(|d| ["postgres", "initdb", "pg_isready"].iter().all(|p| d.join(p).is_file()))
            .map(|dir| Binaries { dir })
            .ok_or(Error::BinariesNotFound)
    }

    pub fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }
}

/// An operating-system user to run the server as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// `None` when this process is not root (the server then runs as this process's user);
    /// otherwise the `postgres` user, or `nobody` where there is none.
    pub fn unprivileged() -> Result<Option<OsUser>, Error> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
        ["postgres", "nobody"]
            .iter()
            .find_map(|name| Self::from_passwd(&passwd, name))
            .map(Some)
            .ok_or(Error::NoUnprivilegedUser)
    }

    fn from_passwd(passwd: &str, name: &str) -> Option<OsUser> {
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            if fields.next()? != name {
                return None;
            }
            let uid = fields.nth(1)?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some(OsUser { name: name.to_owned(), uid, gid })
        })
    }

    /// Whether this user may traverse `dir` (search permission), judged from its mode bits.
    fn can_traverse(&self, meta: &fs::Metadata) -> bool {
        let mode = meta.permissions().mode();
        if meta.uid() == self.uid {
            mode & 0o100 != 0
        } else if meta.gid() == self.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        }
    }
}

/// How to run a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The cluster's own directory (`PGDATA`); created on first start.
    pub data_dir: PathBuf,
    /// Where the server puts its Unix socket.
    pub socket_dir: PathBuf,
    /// Only names the socket file (`.s.PGSQL.<port>`) unless `settings` turn on TCP.
    pub port: u16,
    /// The superuser `initdb` creates; local connections are trusted, so keep the socket private.
    pub superuser: String,
    /// Server settings passed as `-c name=value`.
    pub settings: Vec<(String, String)>,
    /// Skip `initdb`'s fsync: for throwaway test clusters only.
    pub fast_initdb: bool,
    /// Where the server's own log goes.
    pub log_file: PathBuf,
    /// How long to wait for the server to accept connections.
    pub start_timeout: Duration,
    /// Run as a hot standby of another cluster (see the module's comment); `None` for a primary.
    pub standby_of: Option<Standby>,
}

/// Where a standby streams from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standby {
    /// A libpq connection string for the primary in key=value form (`host=/run/keel port=5432
    /// user=keel`), as `pg_basebackup -d` takes it; it is written into the standby's configuration.
    /// Its user must be allowed replication connections (the superuser of a cluster this crate
    /// created is: `initdb` trusts local replication connections).
    pub primary: String,
    /// The physical replication slot on the primary that this standby streams through; created by
    /// the first start.
    pub slot: String,
}

impl ClusterSpec {
    pub fn new(data_dir: impl Into<PathBuf>, socket_dir: impl Into<PathBuf>) -> ClusterSpec {
        let data_dir = data_dir.into();
        let log_file = data_dir.with_extension("log");
        ClusterSpec {
            data_dir,
            socket_dir: socket_dir.into(),
            port: 5432,
            superuser: "keel".to_owned(),
            settings: Vec::new(),
            fast_initdb: false,
            log_file,
            start_timeout: Duration::from_secs(60),
            standby_of: None,
        }
    }

    pub fn setting(mut self, name: &str, value: impl ToString) -> ClusterSpec {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }

    /// The path of the server's socket file.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    /// A libpq connection string for `database` over the Unix socket.
    pub fn connection_string(&self, database: &str) -> String {
        format!("host={} port={} user={} dbname={}", self.socket_dir.display(), self.port, self.superuser, database)
    }
}

/// A running cluster. Dropping it without [`Cluster::stop`] leaves the server running until this
/// process exits, when the kernel's parent-death signal stops it.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    pid: i32,
    /// Receives the server's exit status from the supervisor thread. In a mutex so that a cluster
    /// can be shared between threads (a test binary keeps one in a static).
    exited: Mutex<mpsc::Receiver<io::Result<std::process::ExitStatus>>>,
}

impl Cluster {
    /// Creates the cluster if needed and starts it; returns once it accepts connections.
    pub fn start(spec: ClusterSpec) -> Result<Cluster, Error> {
        let binaries = Binaries::find()?;
        let user = OsUser::unprivileged()?;
        check_socket_path(&spec)?;
        prepare_dirs(&spec, user.as_ref())?;
        if !spec.data_dir.join("PG_VERSION").exists() {
            match &spec.standby_of {
                None => initdb(&binaries, &spec, user.as_ref())?,
                Some(standby) => base_backup(&binaries, &spec, standby, user.as_ref())?,
            }
        }
        clear_stale_pid_file(&spec.data_dir)?;
        let (pid, exited) = spawn_supervised(&binaries, &spec, user.as_ref())?;
        let cluster = Cluster { spec, pid, exited: Mutex::new(exited) };
        cluster.wait_until_ready()?;
        tracing::info!(pid, data_dir = %cluster.spec.data_dir.display(), "PostgreSQL started");
        Ok(cluster)
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn connection_string(&self, database: &str) -> String {
        self.spec.connection_string(database)
    }

    /// Whether this cluster is a standby (see [`ClusterSpec::standby_of`]).
    pub fn is_standby(&self) -> bool {
        self.spec.standby_of.is_some()
    }

    fn exited(&self) -> std::sync::MutexGuard<'_, mpsc::Receiver<io::Result<std::process::ExitStatus>>> {
        self.exited.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_until_ready(&self) -> Result<(), Error> {
        let deadline = Instant::now() + self.spec.start_timeout;
        loop {
            if self.exited().try_recv().is_ok() {
                return Err(Error::ExitedDuringStart(self.spec.log_file.clone()));
            }
            // The server's own word, as `pg_ctl start -w` reads it: the last line of postmaster.pid
            // says "ready" once it accepts connections, or "standby" once a hot standby has replayed
            // enough to be consistent and accepts read-only ones. (Probing with a connection, as
            // pg_isready does, logs a FATAL "the database system is starting up" for every early
            // probe.) Only the file of this server: a killed server's file stays behind, with the
            // status it last had, until the new server replaces it.
            let ready = postmaster_status(&self.spec.data_dir)
                .is_some_and(|(pid, status)| pid == self.pid && is_ready(&status));
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::StartTimeout(self.spec.start_timeout, self.spec.log_file.clone()));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown: disconnects clients, writes a checkpoint, and waits for the server to exit.
    /// Falls back to an immediate shutdown if the server has not exited after `timeout`.
    pub fn stop(self, timeout: Duration) -> Result<(), Error> {
        signal(self.pid, libc::SIGINT);
        let exited = self.exited();
        match exited.recv_timeout(timeout) {
            Ok(status) => {
                let status = status.map_err(io_err("waiting for PostgreSQL"))?;
                tracing::info!(%status, "PostgreSQL stopped");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(?timeout, "PostgreSQL did not stop in time; shutting it down immediately");
                signal(self.pid, libc::SIGQUIT);
                let _ = exited.recv_timeout(Duration::from_secs(10));
                Ok(())
            }
        }
    }

    /// Kills the server outright (SIGKILL), as a crash would: no checkpoint, so the next start runs
    /// crash recovery. For tests. Returns once the postmaster and every process it had started have
    /// exited (they notice their postmaster is gone), so that the cluster can be started again at
    /// once: a new postmaster refuses to start while an old backend still holds the shared memory.
    pub fn kill(self, timeout: Duration) -> Result<(), Error> {
        let children = children_of(self.pid);
        signal(self.pid, libc::SIGKILL);
        let _ = self.exited().recv_timeout(timeout);
        let deadline = Instant::now() + timeout;
        while children.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            if Instant::now() > deadline {
                return Err(Error::Command {
                    what: "killing PostgreSQL".to_owned(),
                    detail: format!("its processes had not exited after {timeout:?}"),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(pid = self.pid, "PostgreSQL killed");
        Ok(())
    }
}

/// The pids of the processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // The fourth field, after the command in parentheses (which may hold spaces).
            let parent: i32 = stat.get(stat.rfind(')')? + 2..)?.split(' ').nth(1)?.parse().ok()?;
            (parent == pid).then_some(child)
        })
        .collect()
}

/// postmaster.pid's status line of a server that accepts connections: "ready", or "standby" for a
/// hot standby that accepts read-only ones (`pg_ctl` accepts both).
fn is_ready(status: &str) -> bool {
    status == "ready" || status == "standby"
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn check_socket_path(spec: &ClusterSpec) -> Result<(), Error> {
    let path = spec.socket_path();
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong { path, len });
    }
    Ok(())
}

/// Creates the data and socket directories, owned by the server's user, and checks that user can
/// reach them through every ancestor.
fn prepare_dirs(spec: &ClusterSpec, user: Option<&OsUser>) -> Result<(), Error> {
    for dir in [&spec.data_dir, &spec.socket_dir] {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        own_dir(dir, user)?;
        if let Some(user) = user {
            check_reachable(dir, user)?;
        }
    }
    if let Some(parent) = spec.log_file.parent() {
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    Ok(())
}

/// Makes `dir` private (mode 700) and, if given, `user`'s. Through a descriptor opened without
/// following a symbolic link: run as root, a link planted where the directory should be (say, to
/// /etc) must not hand its target to the server's user, and checking first and changing after
/// would leave a moment to swap one in.
fn own_dir(dir: &Path, user: Option<&OsUser>) -> Result<(), Error> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let refuse = |e: io::Error| {
        // O_NOFOLLOW refuses a link (ELOOP, or ENOTDIR with O_DIRECTORY): say so plainly.
        let link = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        let e = if link {
            io::Error::new(io::ErrorKind::InvalidInput, "it is a symbolic link: give the real directory")
        } else {
            e
        };
        io_err(format!("taking {}", dir.display()))(e)
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| refuse(io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path")))?;
    // SAFETY: `path` is a valid NUL-terminated string; the descriptor is owned by `file` below.
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(refuse(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = unsafe { <fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    file.set_permissions(fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("setting permissions of {}", dir.display())))?;
    if let Some(user) = user {
        // SAFETY: fchown on a descriptor we own.
        if unsafe { libc::fchown(file.as_raw_fd(), user.uid, user.gid) } != 0 {
            return Err(io_err(format!("giving {} to {}", dir.display(), user.name))(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn check_reachable(dir: &Path, user: &OsUser) -> Result<(), Error> {
    let dir = dir.canonicalize().map_err(io_err(format!("resolving {}", dir.display())))?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = fs::metadata(ancestor).map_err(io_err(format!("reading {}", ancestor.display())))?;
        if !user.can_traverse(&meta) {
            return Err(Error::Unreachable { user: user.name.clone(), dir: ancestor.to_path_buf() });
        }
    }
    Ok(())
}

fn as_user(command: &mut Command, user: Option<&OsUser>) {
    if let Some(user) = user {
        command.uid(user.uid).gid(user.gid);
    }
}

fn run(mut command: Command, what: &str) -> Result<(), Error> {
    let output = command.output().map_err(io_err(format!("running {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        what: what.to_owned(),
        detail: format!(
            "{}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

fn initdb(binaries: &Binaries, spec: &ClusterSpec, user: Option<&OsUser>) -> Result<(), Error> {
    tracing::info!(data_dir = %spec.data_dir.display(), "creating PostgreSQL cluster");
    let mut command = Command::new(binaries.path("initdb"));
    command
        .arg("-D")
        .arg(&spec.data_dir)
        .args(["-U", &spec.superuser, "-A", "trust", "-E", "UTF8", "--locale=C"])
        // initdb changes into the data directory's parent: it must not inherit a working
        // directory the server's user cannot read.
        .current_dir(&spec.data_dir);
    if spec.fast_initdb {
        command.arg("--no-sync");
    }
    as_user(&mut command, user);
    run(command, "initdb")
}

/// Copies the primary into `spec.data_dir` with `pg_basebackup`, creating the standby's replication
/// slot and writing its standby configuration (`-R`: `standby.signal`, and `primary_conninfo` and
/// `primary_slot_name` in `postgresql.auto.conf`).
///
/// The copy goes into a directory beside the data directory and is renamed into place when
/// complete: a copy cut short (the primary gone, the disk full, this process killed) must not be
/// taken for a cluster by the next start, which only looks for `PG_VERSION`. The next start removes
/// such a leftover and copies again.
fn base_backup(binaries: &Binaries, spec: &ClusterSpec, standby: &Standby, user: Option<&OsUser>) -> Result<(), Error> {
    tracing::info!(
        data_dir = %spec.data_dir.display(),
        slot = %standby.slot,
        "creating a PostgreSQL standby: taking a base backup of the primary"
    );
    let name = spec.data_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = spec.data_dir.with_file_name(format!(".{name}.partial"));
    let attempt = |create_slot: bool| -> Result<(), Error> {
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(io_err(format!("removing {}", partial.display())))?;
        }
        fs::create_dir_all(&partial).map_err(io_err(format!("creating {}", partial.display())))?;
        own_dir(&partial, user)?;
        let mut command = Command::new(binaries.path("pg_basebackup"));
        command
            .arg("-D")
            .arg(&partial)
            .args(["-d", &standby.primary, "-X", "stream", "-R", "-S", &standby.slot])
            // An immediate checkpoint on the primary: the default, spread over minutes, would hold
            // the standby's first start for as long.
            .args(["--checkpoint=fast", "--no-password"])
            // Like initdb: a working directory the server's user can read.
            .current_dir(&partial);
        if create_slot {
            command.arg("-C");
        }
        if spec.fast_initdb {
            command.arg("--no-sync");
        }
        as_user(&mut command, user);
        run(command, "pg_basebackup")
    };
    let copied = match attempt(true) {
        // An earlier attempt that died after creating the slot: use it. (Its WAL, kept since then,
        // is released as the new standby streams.)
        Err(Error::Command { detail, .. }) if detail.contains("already exists") => {
            tracing::info!(slot = %standby.slot, "the replication slot exists already; using it");
            attempt(false)
        }
        other => other,
    };
    if let Err(e) = copied {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    // prepare_dirs created the (empty) data directory; the complete copy takes its place.
    fs::remove_dir(&spec.data_dir).map_err(io_err(format!("replacing {} with the copy", spec.data_dir.display())))?;
    fs::rename(&partial, &spec.data_dir).map_err(io_err(format!(
        "renaming {} to {}",
        partial.display(),
        spec.data_dir.display()
    )))?;
    Ok(())
}

/// A crash leaves `postmaster.pid` behind. PostgreSQL itself ignores one whose pid is dead, but
/// refuses to start when that pid now belongs to another process (common after a reboot or in a
/// container); only that case is Keel's to mend, and only when it is sure no server runs there:
/// the pid is alive, it is visibly not a `postgres` (its name can be read), and nothing answers on
/// the socket the file records. Anything less certain is left to PostgreSQL, which refuses to
/// start rather than run two servers on one directory.
fn clear_stale_pid_file(data_dir: &Path) -> Result<(), Error> {
    let pid_file = data_dir.join("postmaster.pid");
    let Ok(contents) = fs::read_to_string(&pid_file) else { return Ok(()) };
    let mut lines = contents.lines();
    let pid: i32 = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    // The fourth and fifth lines: the port, and the directory of the socket the server listens on.
    let (port, socket_dir) = (lines.nth(2).unwrap_or_default().trim(), lines.next().unwrap_or_default().trim());
    // SAFETY: kill with signal 0 only asks whether the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if !alive {
        return Ok(()); // PostgreSQL sees the dead pid and starts.
    }
    let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else {
        return Err(Error::AlreadyRunning { pid, dir: data_dir.to_path_buf() }); // cannot tell: assume so
    };
    let answers = !socket_dir.is_empty()
        && std::os::unix::net::UnixStream::connect(Path::new(socket_dir).join(format!(".s.PGSQL.{port}"))).is_ok();
    if comm.trim() == "postgres" || answers {
        return Err(Error::AlreadyRunning { pid, dir: data_dir.to_path_buf() });
    }
    tracing::warn!(
        pid,
        process = comm.trim(),
        "removing a stale postmaster.pid whose pid now belongs to another process"
    );
    fs::remove_file(&pid_file).map_err(io_err(format!("removing {}", pid_file.display())))
}

/// Spawns `postgres` from a dedicated thread that then waits for it. The parent-death signal is tied
/// to the thread that forked the child, so that thread must live as long as the server.
fn spawn_supervised(
    binaries: &Binaries,
    spec: &ClusterSpec,
    user: Option<&OsUser>,
) -> Result<(i32, mpsc::Receiver<io::Result<std::process::ExitStatus>>), Error> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)
        .map_err(io_err(format!("opening {}", spec.log_file.display())))?;
    let log_err = log.try_clone().map_err(io_err("duplicating the log file"))?;
    let mut command = Command::new(binaries.path("postgres"));
    command
        .arg("-D")
        .arg(&spec.data_dir)
        .arg("-p")
        .arg(spec.port.to_string())
        .arg("-k")
        .arg(&spec.socket_dir)
        .current_dir(&spec.data_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if spec.standby_of.is_some() {
        // Queries on the standby, and feedback so that the primary's vacuum does not remove row
        // versions they still read (replay would otherwise cancel them). Before the spec's own
        // settings, which may override them.
        command.args(["-c", "hot_standby=on", "-c", "hot_standby_feedback=on"]);
    }
    for (name, value) in &spec.settings {
        command.arg("-c").arg(format!("{name}={value}"));
    }
    as_user(&mut command, user);
    // A process group of its own: a terminal's Ctrl-C (SIGINT to the whole foreground group) then
    // reaches the owner only, which drains its clients and flushes what it holds in memory before it
    // stops the server itself. In the owner's group, the server would begin a fast shutdown at once
    // and cut the owner's connections while they were still in use.
    command.process_group(0);
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            // Fast shutdown when our owner dies. Set after the uid change, which clears it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The owner may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (started_tx, started_rx) = mpsc::channel();
    let (exited_tx, exited_rx) = mpsc::channel();
    thread::Builder::new()
        .name("postgres-supervisor".into())
        .spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = started_tx.send(Ok(child.id() as i32));
                let _ = exited_tx.send(child.wait());
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
        })
        .map_err(io_err("spawning the supervisor thread"))?;
    let pid = started_rx
        .recv()
        .map_err(|_| Error::ExitedDuringStart(spec.log_file.clone()))?
        .map_err(io_err("starting postgres"))?;
    Ok((pid, exited_rx))
}

/// The pid in `postmaster.pid` (its first line) and the server's status line (its eighth:
/// "starting", "ready", "standby", "stopping"), once written.
fn postmaster_status(data_dir: &Path) -> Option<(i32, String)> {
    let pid_file = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid = pid_file.lines().next()?.trim().parse().ok()?;
    pid_file.lines().nth(7).map(|line| (pid, line.trim().to_owned()))
}

/// Picks a socket directory: `preferred` if the socket path fits the kernel's limit, otherwise a
/// short directory under `/tmp` named after `preferred`, so the same data directory always gets the
/// same socket directory.
pub fn socket_dir_for(preferred: &Path, port: u16) -> PathBuf {
    let fits = preferred.join(format!(".s.PGSQL.{port}")).as_os_str().len() <= MAX_SOCKET_PATH;
    if fits {
        return preferred.to_path_buf();
    }
    // FNV-1a: stable, tiny, and collisions only cost a clear "already running" error.
    let hash = preferred
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    PathBuf::from(format!("/tmp/keel-{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_standby_that_accepts_connections_is_ready() {
        assert!(is_ready("ready"));
        assert!(is_ready("standby"));
        assert!(!is_ready("starting"));
        assert!(!is_ready("stopping"));
    }

    #[test]
    fn reads_users_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            OsUser::from_passwd(passwd, "postgres"),
            Some(OsUser { name: "postgres".into(), uid: 101, gid: 104 })
        );
        assert_eq!(OsUser::from_passwd(passwd, "nobody"), None);
    }

    #[test]
    fn long_socket_dirs_are_replaced_by_a_stable_short_one() {
        let short = Path::new("/srv/keel/run");
        assert_eq!(socket_dir_for(short, 5432), short);
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        let chosen = socket_dir_for(&long, 5432);
        assert!(chosen.to_str().unwrap().starts_with("/tmp/keel-"), "{chosen:?}");
        assert_eq!(chosen, socket_dir_for(&long, 5432));
        assert!(chosen.join(".s.PGSQL.5432").as_os_str().len() <= MAX_SOCKET_PATH);
    }

    #[test]
    fn a_pid_file_of_a_process_that_is_not_postgres_is_removed_only_if_no_server_answers() {
        let dir = std::env::temp_dir().join(format!("keel-pg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // Our own pid: alive, but not a postgres; and nothing listens on the socket it names.
        let pid_file =
            |socket_dir: &Path| format!("{}\n/data\n1\n5499\n{}\n", std::process::id(), socket_dir.display());
        fs::write(dir.join("postmaster.pid"), pid_file(&dir)).unwrap();
        clear_stale_pid_file(&dir).unwrap();
        assert!(!dir.join("postmaster.pid").exists());
        // Something answers on the recorded socket: a server may be running there, whatever the pid.
        let _listener = std::os::unix::net::UnixListener::bind(dir.join(".s.PGSQL.5499")).unwrap();
        fs::write(dir.join("postmaster.pid"), pid_file(&dir)).unwrap();
        assert!(matches!(clear_stale_pid_file(&dir), Err(Error::AlreadyRunning { .. })));
        assert!(dir.join("postmaster.pid").exists(), "left for PostgreSQL to judge");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pid_file_of_a_dead_process_is_left_to_postgres() {
        let dir = std::env::temp_dir().join(format!("keel-pg-dead-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        fs::write(dir.join("postmaster.pid"), format!("{dead}\n/data\n")).unwrap();
        clear_stale_pid_file(&dir).unwrap();
        assert!(dir.join("postmaster.pid").exists(), "PostgreSQL itself ignores a dead pid's file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symbolic_link_where_a_directory_should_be_is_refused_not_followed() {
        let dir = std::env::temp_dir().join(format!("keel-pg-link-{}", std::process::id()));
        let target = dir.join("elsewhere");
        fs::create_dir_all(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("data")).unwrap();
        let error = own_dir(&dir.join("data"), None).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "the link's target is untouched");
        own_dir(&target, None).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }
}
