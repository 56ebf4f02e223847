//! Account passwords, following NIST SP 800-63B (§3.1.1.2, memorized secrets) and OWASP's Password
//! Storage Cheat Sheet:
//!
//! - **Choosing one** ([`check_new_password`], [`PasswordPolicy`]): at least 8 characters, at most
//!   128 (so any passphrase of 64 or more fits), any characters, no composition rules ("one digit,
//!   one capital"), and no password that is common or guessable from what the service knows of the
//!   user (e-mail address, name): zxcvbn's estimate must reach 3 of 4.
//! - **Storing one** ([`hash`], [`verify`]): Argon2id with OWASP's parameters, as a PHC string
//!   (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) that carries its own parameters, so a change of
//!   [`M_COST_KIB`], [`T_COST`] or [`P_COST`] leaves the stored hashes verifiable and [`verify`] says
//!   when one should be re-hashed (at the next sign-in, the only time the password is at hand).
//! - **Not telling which accounts exist**: [`verify_dummy`] costs what a wrong password costs, for a
//!   sign-in with an unknown e-mail address.
//! - **Not starving the server**: a hash takes tens of milliseconds of CPU and 19 MiB of memory, and
//!   the guessability check of a long password up to about as much CPU. [`Hasher`] runs both on
//!   threads of its own at a lower priority, never on the executor, at most one per thread at once
//!   (by default one thread per core), so a burst of sign-ins queues there instead of taking the
//!   cores and the memory from the other requests.

use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Instant;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::Error as HashError;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Choosing a password
// ---------------------------------------------------------------------------------------------

/// What a new password must be. [`PasswordPolicy::NIST`] is the one Keel uses
/// ([`check_new_password`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Fewest characters (Unicode scalar values, `chars().count()`): NIST's minimum is 8.
    pub min_chars: usize,
    /// Most characters. NIST asks that at least 64 be allowed. The cap bounds the CPU work spent on
    /// input an unauthenticated client chooses: zxcvbn's estimate matches every substring against
    /// its dictionaries and patterns, and costs about as much as a hash for a long input (measured
    /// in a release build: 0.07 ms for 12 characters, 5 ms for a 128-character passphrase, up to
    /// 19 ms for 128 characters of keyboard rows or digits). zxcvbn itself looks at the first 100
    /// characters only, but the lower-casing and comparisons here see the whole string, and so does
    /// hashing. From async code, check through [`Hasher::check_new_password`].
    pub max_chars: usize,
    /// Lowest zxcvbn score accepted, 0 to 4: 3 is "safely unguessable: moderate protection from an
    /// offline slow-hash scenario" (fewer than 10¹⁰ guesses refused).
    pub min_score: u8,
}

impl PasswordPolicy {
    /// NIST SP 800-63B with zxcvbn as the blocklist: 8 to 128 characters, score 3 or more.
    pub const NIST: PasswordPolicy = PasswordPolicy { min_chars: 8, max_chars: 128, min_score: 3 };

    /// `Ok` when `password` may be chosen, else a sentence for the user naming what is wrong.
    /// `user_inputs` are what the service knows of the user (e-mail address, name), which the
    /// password must not be nor be made of: a password guessable from them is refused.
    pub fn check(&self, password: &str, user_inputs: &[&str]) -> Result<(), String> {
        // Length first: it bounds the work below.
        let chars = password.chars().count();
        if chars < self.min_chars {
            return Err(format!("the password is too short: at least {} characters", self.min_chars));
        }
        if chars > self.max_chars {
            return Err(format!("the password is too long: at most {} characters", self.max_chars));
        }
        let lowered = password.to_lowercase();
        if user_inputs.iter().any(|input| !input.trim().is_empty() && input.trim().to_lowercase() == lowered) {
            return Err("the password must not be your e-mail address or your name".to_owned());
        }
        let inputs = guessable_words(user_inputs);
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let entropy = zxcvbn::zxcvbn(password, &inputs);
        if u8::from(entropy.score()) < self.min_score {
            let why = match entropy.feedback().and_then(|f| f.warning()) {
                Some(warning) => sentence_part(&warning.to_string()),
                None => "choose a longer one, such as a few uncommon words".to_owned(),
            };
            return Err(format!("the password is too easy to guess: {why}"));
        }
        Ok(())
    }
}

impl Default for PasswordPolicy {
    fn default() -> PasswordPolicy {
        PasswordPolicy::NIST
    }
}

/// [`PasswordPolicy::NIST`]'s verdict on a new password (sign-up, password change or reset):
/// `Ok`, or a sentence for the user naming what is wrong. `user_inputs`: the user's e-mail address
/// and name, which the password must not be guessable from.
pub fn check_new_password(password: &str, user_inputs: &[&str]) -> Result<(), String> {
    PasswordPolicy::NIST.check(password, user_inputs)
}

/// The user's inputs as zxcvbn's user dictionary: each whole, plus the local part of an e-mail
/// address and the words of each (3 letters or more), so that "alice1987" is matched for
/// "alice.smith@example.com" or the name "Alice Smith".
fn guessable_words(user_inputs: &[&str]) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        let w = w.trim().to_lowercase();
        if w.chars().count() >= 3 && !words.contains(&w) {
            words.push(w);
        }
    };
    for input in user_inputs {
        push(input);
        if let Some((local, _domain)) = input.rsplit_once('@') {
            push(local);
        }
        for word in input.split(|c: char| !c.is_alphanumeric()) {
            push(word);
        }
    }
    words
}

/// zxcvbn's "This is a top-10 common password." as "this is a top-10 common password", to follow
/// a colon.
fn sentence_part(s: &str) -> String {
    let s = s.trim().trim_end_matches('.');
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Storing a password
// ---------------------------------------------------------------------------------------------

// Argon2id with OWASP's first recommended configuration, Password Storage Cheat Sheet
// (https://cheatsheetseries.owasp.org/cheatsheets/Password_Storage_Cheat_Sheet.html#argon2id):
// "a minimum configuration of 19 MiB of memory, an iteration count of 2, and 1 degree of
// parallelism". They are also the argon2 crate's defaults, but are spelled out here so that a
// change of the crate's defaults cannot change Keel's hashes unnoticed. Raising them is safe: stored
// hashes carry their own, still verify, and are re-hashed at their next sign-in.

/// Argon2id memory cost, in KiB: 19 MiB (OWASP).
pub const M_COST_KIB: u32 = 19 * 1024;
/// Argon2id iterations (OWASP).
pub const T_COST: u32 = 2;
/// Argon2id lanes, the degree of parallelism (OWASP). 1: parallelism within one hash would only
/// take cores from the other sign-ins.
pub const P_COST: u32 = 1;
/// Length of the hash output, bytes (the PHC default).
const OUTPUT_LEN: usize = 32;
/// Length of the salt, bytes: 128 bits, as RFC 9106 and the PHC format recommend.
const SALT_LEN: usize = 16;

// A stored hash is ours, but one with absurd parameters (a corrupted row, a bad import) must not take
// gigabytes or minutes to check: such a hash is refused with a warning.
const MAX_STORED_M_COST_KIB: u32 = 1024 * 1024;
const MAX_STORED_T_COST: u32 = 64;
const MAX_STORED_P_COST: u32 = 16;

const PARAMS: Params = match Params::new(M_COST_KIB, T_COST, P_COST, Some(OUTPUT_LEN)) {
    Ok(params) => params,
    Err(_) => panic!("invalid Argon2 parameters"),
};

fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS)
}

/// `password` hashed with Argon2id and the current parameters under a fresh random salt, as a PHC
/// string to store. CPU-heavy (tens of milliseconds) and 19 MiB of memory: from async code, use
/// [`Hasher::hash`].
pub fn hash(password: &str) -> String {
    let mut salt = [0u8; SALT_LEN];
    keel_random::secure_bytes(&mut salt);
    argon2()
        .hash_password_with_salt(password.as_bytes(), &salt)
        // Fails only for parameters, salt or output lengths out of range, all constants here.
        .expect("Argon2 hashing with constant parameters cannot fail")
        .to_string()
}

/// Whether a password matched a stored hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// It matched. `rehash`: the stored hash was made with other parameters (or another Argon2
    /// variant) than the current ones: store [`hash`] of the password now, while it is at hand.
    Yes { rehash: bool },
    /// It did not match, or the stored hash could not be read (logged as a warning).
    No,
}

/// Checks `password` against `phc`, a stored PHC string, using the parameters that string carries.
/// The comparison of the outputs is in constant time. CPU-heavy: from async code, use
/// [`Hasher::verify`].
pub fn verify(password: &str, phc: &str) -> Verified {
    let stored = match PasswordHash::new(phc) {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "a stored password hash is not a PHC string: treated as not matching");
            return Verified::No;
        }
    };
    let params = match Params::try_from(&stored) {
        Ok(params) => params,
        Err(e) => {
            tracing::warn!(error = %e, algorithm = %stored.algorithm, "a stored password hash has unreadable parameters: treated as not matching");
            return Verified::No;
        }
    };
    if params.m_cost() > MAX_STORED_M_COST_KIB
        || params.t_cost() > MAX_STORED_T_COST
        || params.p_cost() > MAX_STORED_P_COST
    {
        tracing::warn!(
            m_cost = params.m_cost(),
            t_cost = params.t_cost(),
            p_cost = params.p_cost(),
            "a stored password hash has parameters beyond the accepted maximum: treated as not matching"
        );
        return Verified::No;
    }
    // The algorithm, version and parameters come from `stored`, not from this instance.
    match argon2().verify_password(password.as_bytes(), &stored) {
        Ok(()) => Verified::Yes { rehash: needs_rehash(&stored, &params) },
        Err(HashError::PasswordInvalid) => Verified::No,
        Err(e) => {
            tracing::warn!(error = %e, algorithm = %stored.algorithm, "a stored password hash cannot be verified: treated as not matching");
            Verified::No
        }
    }
}

/// Whether a hash that verified was made otherwise than [`hash`] makes one now.
fn needs_rehash(stored: &PasswordHash, params: &Params) -> bool {
    stored.algorithm != argon2::ARGON2ID_IDENT
        || stored.version != Some(Version::V0x13.into())
        || params.m_cost() != M_COST_KIB
        || params.t_cost() != T_COST
        || params.p_cost() != P_COST
        || params.output_len() != Some(OUTPUT_LEN)
        || !params.keyid().is_empty()
        || !params.data().is_empty()
        || stored.salt.as_ref().is_none_or(|salt| salt.len() < SALT_LEN)
}

/// Does what [`verify`] does against a hash made with the current parameters, and forgets the
/// answer: a sign-in for an unknown e-mail address calls it so that it takes as long as a wrong
/// password for a known one. (The dummy hash is made at the first call, which therefore costs two
/// hashes once per process; [`Hasher::new`] cannot make it ahead without blocking its caller, and
/// a caller that wants it made may call [`warm_up`] on a blocking thread at start-up.)
pub fn verify_dummy(password: &str) {
    let _ = verify(password, dummy_hash());
}

/// Makes the dummy hash of [`verify_dummy`] now (one hash's worth of CPU), so that the first
/// unknown-account sign-in costs no more than later ones. Blocking.
pub fn warm_up() {
    dummy_hash();
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    // Its password is of no account: the hash is never stored and no answer of it is used.
    DUMMY.get_or_init(|| hash("keel: no account has this password"))
}

// ---------------------------------------------------------------------------------------------
// Hashing off the executor, bounded
// ---------------------------------------------------------------------------------------------

/// Runs hashes and verifications on threads of its own, `threads` of them, at a lower priority than
/// the threads that serve requests; further callers wait for a turn (in FIFO order). Cheap to clone:
/// clones share the threads, which end when the last clone is dropped.
///
/// Why threads of its own, and not tokio's blocking pool: so that they can run at a lower priority
/// (nice 19, the lowest), which a pool shared with other blocking work could not be given (and an
/// unprivileged process cannot raise a thread's priority back). When hashing and serving both want a
/// core, the scheduler gives it to serving (a nice-19 thread weighs about 1/70 of a nice-0 one, yet
/// is never starved outright), so a burst of sign-ins takes mostly the CPU the requests leave idle;
/// and with at most `threads` hashes at once, their memory (19 MiB each) is bounded too.
///
/// Metrics: `keel_password_hash_seconds{op}` (the work itself, per hash, verification or check, `op`
/// being `hash`, `verify`, `verify_dummy` or `check`), `keel_password_wait_seconds` (time waiting for a turn) and
/// `keel_password_waiting` (calls waiting now, summed over every `Hasher` of the process).
#[derive(Clone, Debug)]
pub struct Hasher {
    queue: mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// One hash per core: each one is single-threaded (p = 1), so more at once would only share the
/// cores more thinly and delay every one of them, and fewer would leave cores idle during a burst.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).max(1)
}

impl Hasher {
    /// `threads` hashing threads (0 is taken as 1). The memory peak is `threads` × 19 MiB.
    pub fn new(threads: usize) -> Hasher {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("keel-hasher-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held while waiting for a job, never while running one.
                        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            // Every clone of the Hasher is gone.
                            Err(mpsc::RecvError) => return,
                        }
                    }
                })
                .expect("the system can start a thread");
        }
        Hasher { queue }
    }

    /// [`hash`], off the executor.
    pub async fn hash(&self, password: &str) -> String {
        let password = password.to_owned();
        self.run("hash", move || hash(&password)).await
    }

    /// [`verify`], off the executor.
    pub async fn verify(&self, password: &str, phc: &str) -> Verified {
        let (password, phc) = (password.to_owned(), phc.to_owned());
        self.run("verify", move || verify(&password, &phc)).await
    }

    /// [`verify_dummy`], off the executor: an unknown account waits its turn like a known one.
    pub async fn verify_dummy(&self, password: &str) {
        let password = password.to_owned();
        self.run("verify_dummy", move || verify_dummy(&password)).await
    }

    /// [`check_new_password`], off the executor (for a long password it costs about what a hash
    /// does), and in turn with the hashes.
    pub async fn check_new_password(&self, password: &str, user_inputs: &[&str]) -> Result<(), String> {
        let password = password.to_owned();
        let user_inputs: Vec<String> = user_inputs.iter().map(|&s| s.to_owned()).collect();
        self.run("check", move || {
            let user_inputs: Vec<&str> = user_inputs.iter().map(String::as_str).collect();
            check_new_password(&password, &user_inputs)
        })
        .await
    }

    async fn run<T: Send + 'static>(&self, op: &'static str, work: impl FnOnce() -> T + Send + 'static) -> T {
        let (answer, answered) = oneshot::channel();
        let queued = Instant::now();
        let waiting = Waiting::start();
        let job: Job = Box::new(move || {
            drop(waiting);
            metrics::histogram!("keel_password_wait_seconds").record(queued.elapsed().as_secs_f64());
            // A caller that gave up while waiting (a request timed out, a client went away) wants no
            // answer: its turn goes to the next. One that gives up while its work runs keeps the
            // thread until the work ends, so the bound holds.
            if answer.is_closed() {
                return;
            }
            let started = Instant::now();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            metrics::histogram!("keel_password_hash_seconds", "op" => op).record(started.elapsed().as_secs_f64());
            let _ = answer.send(out);
        });
        self.queue.send(job).expect("the hashing threads live as long as the Hasher");
        match answered.await {
            Ok(Ok(out)) => out,
            // The work panicked (it does not, short of a bug or an allocation failure): the panic
            // goes on in the caller, as if the work had run there.
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("a hashing thread ended without answering"),
        }
    }
}

/// Lowers the calling thread's scheduling priority to nice 19 (Linux keeps one per thread). Best
/// effort: where it cannot be done, hashing runs at the normal priority, still bounded.
const HASHING_NICENESS: libc::c_int = 19;

fn lower_priority() {
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    let done = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, HASHING_NICENESS)
    };
    if done != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not lower the hashing threads' priority");
    }
}

/// Counts a caller in `keel_password_waiting` while it waits for a turn, and out again however
/// the wait ends (a turn, or the caller's future dropped).
struct Waiting;

impl Waiting {
    fn start() -> Waiting {
        metrics::gauge!("keel_password_waiting").increment(1.0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!("keel_password_waiting").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const EMAIL: &str = "alice.smith@example.com";
    const NAME: &str = "Alice Smith";

    #[test]
    fn the_policy_accepts_a_good_passphrase() {
        check_new_password("correct horse battery staple", &[EMAIL, NAME]).unwrap();
        check_new_password("quartz lantern beneath velvet", &[EMAIL, NAME]).unwrap();
        // No composition rule, and any characters: spaces and non-ASCII count as characters.
        check_new_password("ünïcödé pässwörd ñøt ïn ä lïst", &[]).unwrap();
        // 64 characters and up to 128 are allowed.
        let long = "mountain river glacier comet tulip anchor violin meadow lantern x".to_owned();
        assert_eq!(long.chars().count(), 65);
        check_new_password(&long, &[EMAIL]).unwrap();
        let longest: String = (0..128).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
        check_new_password(&longest, &[]).unwrap();
    }

    #[test]
    fn the_policy_refuses_common_short_long_and_personal_passwords() {
        let e = check_new_password("password", &[EMAIL, NAME]).unwrap_err();
        assert!(e.starts_with("the password is too easy to guess: "), "{e}");
        assert!(e.contains("common password"), "{e}");
        let e = check_new_password("12345678", &[EMAIL, NAME]).unwrap_err();
        assert!(e.starts_with("the password is too easy to guess"), "{e}");
        assert!(check_new_password("Password1!", &[]).is_err(), "composition does not make a common password strong");
        assert_eq!(check_new_password("a7$Kq2!", &[]).unwrap_err(), "the password is too short: at least 8 characters");
        // Characters are counted, not bytes: 7 two-byte characters are too short.
        assert!(check_new_password("ééééééé", &[]).unwrap_err().contains("too short"));
        assert_eq!(check_new_password("", &[]).unwrap_err(), "the password is too short: at least 8 characters");
        let too_long: String = "x".repeat(129);
        assert_eq!(check_new_password(&too_long, &[]).unwrap_err(), "the password is too long: at most 128 characters");
        // The e-mail address or the name, in any case, or made of them.
        let e = check_new_password(EMAIL, &[EMAIL, NAME]).unwrap_err();
        assert_eq!(e, "the password must not be your e-mail address or your name");
        assert!(check_new_password("ALICE.SMITH@EXAMPLE.COM", &[EMAIL, NAME]).is_err());
        assert!(check_new_password("alicesmith", &[EMAIL, NAME]).is_err());
        assert!(check_new_password("alice.smith1", &[EMAIL, NAME]).is_err());
        // An unusual e-mail address is strong by itself: refused only because it is the user's.
        let odd = "zqxv.wombat.kettle@fjordmail.example";
        assert!(check_new_password(odd, &[]).is_ok());
        assert!(check_new_password(odd, &[odd]).is_err());
    }

    #[test]
    fn a_hash_verifies_its_password_and_no_other() {
        let phc = hash("correct horse battery staple");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(verify("correct horse battery staple", &phc), Verified::Yes { rehash: false });
        assert_eq!(verify("correct horse battery stapler", &phc), Verified::No);
        assert_eq!(verify("", &phc), Verified::No);
        // A fresh salt each time.
        assert_ne!(hash("correct horse battery staple"), phc);
    }

    #[test]
    fn a_hash_with_other_parameters_verifies_and_asks_for_a_rehash() {
        let weak = Params::new(4096, 1, 1, None).unwrap();
        let salt = [7u8; SALT_LEN];
        let old = Argon2::new(Algorithm::Argon2id, Version::V0x13, weak)
            .hash_password_with_salt(b"old passphrase kept", &salt)
            .unwrap()
            .to_string();
        assert!(old.starts_with("$argon2id$v=19$m=4096,t=1,p=1$"), "{old}");
        assert_eq!(verify("old passphrase kept", &old), Verified::Yes { rehash: true });
        assert_eq!(verify("old passphrase lost", &old), Verified::No);
        // Another variant with the current parameters.
        let argon2i = Argon2::new(Algorithm::Argon2i, Version::V0x13, PARAMS)
            .hash_password_with_salt(b"old passphrase kept", &salt)
            .unwrap()
            .to_string();
        assert_eq!(verify("old passphrase kept", &argon2i), Verified::Yes { rehash: true });
    }

    #[test]
    fn an_unreadable_stored_hash_never_matches() {
        for stored in [
            "",
            "garbage",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$!!notbase64!!",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$c2FsdHNhbHRzYWx0c2FsdHNhbHQ",
            // Absurd parameters are refused before any work.
            "$argon2id$v=19$m=4000000000,t=2,p=1$c2FsdHNhbHRzYWx0$c2FsdHNhbHRzYWx0c2FsdHNhbHRzYWx0c2FsdHNhbHQ",
        ] {
            assert_eq!(verify("anything", stored), Verified::No, "{stored:?}");
        }
    }

    #[test]
    fn the_dummy_verification_has_the_current_parameters() {
        assert!(dummy_hash().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        verify_dummy("whatever");
        assert_eq!(verify("keel: no account has this password", dummy_hash()), Verified::Yes { rehash: false });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hasher_runs_off_the_executor_and_bounded() {
        let hasher = Hasher::new(2);
        let phc = hasher.hash("correct horse battery staple").await;
        assert_eq!(hasher.verify("correct horse battery staple", &phc).await, Verified::Yes { rehash: false });
        assert_eq!(hasher.verify("wrong", &phc).await, Verified::No);
        hasher.verify_dummy("whatever").await;
        assert!(hasher.check_new_password("correct horse battery staple", &[EMAIL, NAME]).await.is_ok());
        assert!(hasher.check_new_password("alice.smith", &[EMAIL, NAME]).await.is_err());

        // The bound, observed by instrumented work: never more than `max` at once.
        for max in [1, 2] {
            let hasher = Hasher::new(max);
            let running = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let calls: Vec<_> = (0..6)
                .map(|_| {
                    let (hasher, running, peak) = (hasher.clone(), running.clone(), peak.clone());
                    tokio::spawn(async move {
                        hasher
                            .run("test", move || {
                                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(now, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(30));
                                running.fetch_sub(1, Ordering::SeqCst);
                            })
                            .await
                    })
                })
                .collect();
            for call in calls {
                call.await.unwrap();
            }
            assert_eq!(peak.load(Ordering::SeqCst), max, "max_concurrent {max}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_keeps_its_turn_until_its_work_ends() {
        let hasher = Hasher::new(1);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let work = |running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>| {
            move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        // The first caller gives up while its work runs; the second must still wait for it.
        let first =
            tokio::time::timeout(Duration::from_millis(20), hasher.run("test", work(running.clone(), peak.clone())));
        assert!(first.await.is_err());
        hasher.run("test", work(running.clone(), peak.clone())).await;
        assert_eq!(peak.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn hashing_runs_at_a_lower_priority_than_serving() {
        let hasher = Hasher::new(1);
        // SAFETY: gettid and getpriority have no memory-safety preconditions.
        let priority =
            |_: ()| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) };
        let serving = priority(());
        assert_eq!(hasher.run("test", move || priority(())).await, HASHING_NICENESS);
        assert_eq!(priority(()), serving, "the caller's thread keeps its priority");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_while_waiting_costs_no_work() {
        let hasher = Hasher::new(1);
        let ran = Arc::new(AtomicUsize::new(0));
        let busy = hasher.run("test", || std::thread::sleep(Duration::from_millis(100)));
        let counted = ran.clone();
        let abandoned = hasher.run("test", move || counted.fetch_add(1, Ordering::SeqCst));
        let (_, gave_up) = tokio::join!(busy, tokio::time::timeout(Duration::from_millis(20), abandoned));
        assert!(gave_up.is_err());
        hasher.run("test", || ()).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn default_concurrency_is_at_least_one() {
        assert!(default_concurrency() >= 1);
    }

    /// The cost of one hash with the current parameters. Run in a release build:
    /// `cargo test --release -p keel --lib password -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_hash_time() {
        let _ = hash("warm up");
        let n = 20;
        let started = Instant::now();
        for i in 0..n {
            std::hint::black_box(hash(&format!("correct horse battery staple {i}")));
        }
        let per_hash = started.elapsed() / n;
        let phc = hash("correct horse battery staple");
        let started = Instant::now();
        for _ in 0..n {
            std::hint::black_box(verify("correct horse battery staple", &phc));
        }
        let per_verify = started.elapsed() / n;
        let started = Instant::now();
        let long: String = "mountain river glacier comet tulip anchor violin meadow ".repeat(3)[..128].to_owned();
        for _ in 0..n {
            std::hint::black_box(check_new_password(&long, &[EMAIL, NAME]).ok());
        }
        let per_check = started.elapsed() / n;
        println!(
            "argon2id m={M_COST_KIB} KiB t={T_COST} p={P_COST}: {per_hash:?} per hash, {per_verify:?} per verification \
             ({:.0} sign-ins per second per core); zxcvbn on 128 characters: {per_check:?}",
            1.0 / per_verify.as_secs_f64()
        );
    }
}
