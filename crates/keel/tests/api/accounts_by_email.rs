//! Accounts by e-mail, end to end: codes and tokens are read from the messages a real SMTP server
//! received from the workers, as a person would read them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{expect_json, expect_problem, scratch_root, TestApp, Workers, SHARDS};
use crate::peers::{free_port, SmtpServer};

const PASSWORD: &str = "quartz lantern beneath velvet";
const NEW_PASSWORD: &str = "mountain comet tulip anchor";

/// An app whose workers send mail to a real SMTP server, and the mail it received.
async fn spawn_with_mail(verified_to_check_out: bool) -> (TestApp, Inbox, Workers) {
    let port = free_port();
    let smtp = SmtpServer::start(port, &scratch_root().join(format!("maildir-{port}"))).await;
    let app = TestApp::spawn_with(|config| {
        config.smtp_url = Some(format!("smtp://127.0.0.1:{port}"));
        config.checkout_requires_verified_email = verified_to_check_out;
    })
    .await;
    let workers = app.start_workers();
    (app, Inbox::new(smtp), workers)
}

async fn stop(app: &TestApp, workers: Workers) {
    app.check_queues_drained().await;
    workers.stop().await;
}

pub(crate) struct Inbox {
    smtp: SmtpServer,
    /// `Message-ID`s of the messages already read.
    read: HashSet<String>,
}

impl Inbox {
    pub(crate) fn new(smtp: SmtpServer) -> Inbox {
        Inbox { smtp, read: HashSet::new() }
    }

    /// The next message to `to` whose subject is `subject`, not read before, its body decoded.
    pub(crate) async fn next_mail(&mut self, to: &str, subject: &str) -> String {
        let started = Instant::now();
        loop {
            let found =
                self.smtp.messages().into_iter().find(|m| {
                    is_to(m, to) && m.contains(&format!("Subject: {subject}")) && !self.read.contains(&id_of(m))
                });
            if let Some(message) = found {
                self.read.insert(id_of(&message));
                return quoted_printable_decoded(&message);
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no {subject:?} for {to}: {:#?}",
                self.smtp.messages()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every message to `to`, read or not.
    fn mails_to(&self, to: &str) -> Vec<String> {
        self.smtp.messages().into_iter().filter(|m| is_to(m, to)).collect()
    }
}

fn is_to(message: &str, address: &str) -> bool {
    message.lines().take_while(|l| !l.is_empty()).any(|l| l.starts_with("To:") && l.contains(address))
}

/// A message as its reader sees it: the mailer sends plain text as quoted-printable, which breaks
/// lines longer than 76 characters (a reset token's) with `=` and writes some bytes as `=XX`.
fn quoted_printable_decoded(message: &str) -> String {
    let joined = message.replace("=\r\n", "").replace("=\n", "");
    let mut bytes = Vec::with_capacity(joined.len());
    let mut rest = joined.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = tail.get(..2).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (b, hex) {
            (b'=', Some(byte)) => {
                bytes.push(byte);
                rest = &tail[2..];
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).unwrap()
}

fn id_of(message: &str) -> String {
    SmtpServer::message_id(message).expect("every message has a Message-ID")
}

/// The 6-digit code a message carries, on a line of its own.
pub(crate) fn code_in(message: &str) -> String {
    let code = message.lines().map(str::trim).find(|l| l.len() == 6 && l.bytes().all(|b| b.is_ascii_digit()));
    code.unwrap_or_else(|| panic!("no code in {message}")).to_owned()
}

/// The password reset token a message carries: `<user id>.<secret>`, on a line of its own.
fn reset_token_in(message: &str) -> String {
    let token = message.lines().map(str::trim).find(|l| {
        l.split_once('.').is_some_and(|(user, secret)| user.parse::<uuid::Uuid>().is_ok() && secret.len() == 43)
    });
    token.unwrap_or_else(|| panic!("no reset token in {message}")).to_owned()
}

/// A 6-digit code that is not `code`.
fn wrong(code: &str) -> String {
    format!("{:06}", (code.parse::<u32>().unwrap() + 1) % 1_000_000)
}

fn unique_email(name: &str) -> String {
    format!("{name}-{}@example.org", uuid::Uuid::now_v7().simple())
}

async fn sign_up(app: &TestApp, name: &str, email: &str, password: Option<&str>) -> Value {
    let mut body = json!({ "name": name, "email": email });
    if let Some(password) = password {
        body["password"] = json!(password);
    }
    expect_json(app.post("/v1/users").json(&body).send().await, 201).await
}

async fn sign_in(app: &TestApp, credentials: Value) -> reqwest::Response {
    app.post("/v1/sessions").json(&credentials).send().await.unwrap()
}

async fn ask_code(app: &TestApp, email: &str) -> reqwest::Result<reqwest::Response> {
    app.post("/v1/sessions/codes").json(&json!({ "email": email })).send().await
}

/// Runs `sql` with the user's id as `$1` on every shard (the user is on one of them).
async fn on_user_shard(app: &TestApp, user: &str, sql: &str) {
    let user: uuid::Uuid = user.parse().unwrap();
    let mut changed = 0;
    for i in 0..SHARDS {
        changed += app.dbs.shard(i).await.execute(sql, &[&user]).await.unwrap();
    }
    assert!(changed >= 1, "{sql}: nothing changed");
}

#[tokio::test]
async fn a_code_from_the_mail_signs_in_a_second_device_beside_the_others() {
    let (app, mut mail, workers) = spawn_with_mail(false).await;
    let email = unique_email("ida");
    let user = sign_up(&app, "Ida Device", &email, Some(PASSWORD)).await;
    let first = user["access_token"].as_str().unwrap();

    let response = app.post("/v1/sessions/codes").json(&json!({ "email": email })).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let message = mail.next_mail(&email, "Your Keel sign-in code").await;
    assert!(message.contains("valid for 10 minutes"), "{message}");
    let code = code_in(&message);

    let second = app.post("/v1/sessions").header("user-agent", "second device");
    let second = expect_json(second.json(&json!({ "email": email, "code": code })).send().await, 201).await;
    assert_eq!(second["user_id"], user["id"]);
    let third = expect_json(Ok(sign_in(&app, json!({ "email": email, "password": PASSWORD })).await), 201).await;

    let sessions = expect_json(app.get("/v1/sessions").bearer_auth(first).send().await, 200).await;
    let ids: Vec<&str> = sessions.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "sign-up, code and password: {sessions}");
    for session in [&user, &second, &third] {
        assert!(ids.contains(&session["session_id"].as_str().unwrap()), "{session} in {sessions}");
    }
    let by_code = sessions.as_array().unwrap().iter().find(|s| s["id"] == second["session_id"]).unwrap();
    assert_eq!(by_code["user_agent"], "second device");
    // The new device's token works as well as the first.
    let listed =
        expect_json(app.get("/v1/sessions").bearer_auth(second["access_token"].as_str().unwrap()).send().await, 200)
            .await;
    assert_eq!(listed.as_array().unwrap().len(), 3);
    stop(&app, workers).await;
}

#[tokio::test]
async fn a_code_dies_after_five_wrong_guesses_on_expiry_and_once_used() {
    let (app, mut mail, workers) = spawn_with_mail(false).await;
    let email = unique_email("kit");
    let user = sign_up(&app, "Kit Codes", &email, None).await;
    let user_id = user["id"].as_str().unwrap();

    // Five wrong guesses: the right code is refused after them.
    assert_eq!(ask_code(&app, &email).await.unwrap().status(), 202);
    let code = code_in(&mail.next_mail(&email, "Your Keel sign-in code").await);
    for _ in 0..5 {
        let response = sign_in(&app, json!({ "email": email, "code": wrong(&code) })).await;
        expect_problem(Ok(response), 401, "not right").await;
    }
    expect_problem(Ok(sign_in(&app, json!({ "email": email, "code": code })).await), 401, "not right").await;

    // Expired: refused, though never guessed.
    assert_eq!(ask_code(&app, &email).await.unwrap().status(), 202);
    let code = code_in(&mail.next_mail(&email, "Your Keel sign-in code").await);
    on_user_shard(
        &app,
        user_id,
        "UPDATE one_time_codes SET expires_at = now() - interval '1 second' WHERE user_id = $1",
    )
    .await;
    expect_problem(Ok(sign_in(&app, json!({ "email": email, "code": code })).await), 401, "not right").await;

    // Used once: not twice.
    assert_eq!(ask_code(&app, &email).await.unwrap().status(), 202);
    let code = code_in(&mail.next_mail(&email, "Your Keel sign-in code").await);
    expect_json(Ok(sign_in(&app, json!({ "email": email, "code": code })).await), 201).await;
    expect_problem(Ok(sign_in(&app, json!({ "email": email, "code": code })).await), 401, "not right").await;

    // An address with no account, and a locked account's: the same answer, and no mail.
    let nobody = unique_email("nobody");
    let locked_email = unique_email("locked");
    let locked = sign_up(&app, "Lou Locked", &locked_email, None).await;
    mail.next_mail(&locked_email, "Welcome to Keel").await;
    on_user_shard(&app, locked["id"].as_str().unwrap(), "UPDATE users SET locked_at = now() WHERE id = $1").await;
    let known = ask_code(&app, &email).await.unwrap();
    let (known_status, known_body) = (known.status(), known.text().await.unwrap());
    // Its mail read before the next code is asked for: a code replaced before its e-mail is written
    // is not sent (the e-mail worker reads the code's row then), so asking again at once could
    // leave this one unsent on a slow machine.
    mail.next_mail(&email, "Your Keel sign-in code").await;
    for address in [&nobody, &locked_email] {
        let response = ask_code(&app, address).await.unwrap();
        assert_eq!(
            (response.status(), response.text().await.unwrap()),
            (known_status, known_body.clone()),
            "{address}"
        );
    }
    // Asked last, so its mail comes after anything the others could have caused.
    assert_eq!(ask_code(&app, &email).await.unwrap().status(), 202);
    mail.next_mail(&email, "Your Keel sign-in code").await;
    app.check_queues_drained().await;
    assert!(mail.mails_to(&nobody).is_empty(), "{:#?}", mail.mails_to(&nobody));
    assert_eq!(mail.mails_to(&locked_email).len(), 1, "the welcome only: {:#?}", mail.mails_to(&locked_email));
    // Not an address at all: said so.
    expect_problem(ask_code(&app, "not an address").await, 422, "email").await;
    stop(&app, workers).await;
}

#[tokio::test]
async fn a_password_reset_by_email_ends_every_session_and_works_once() {
    let (app, mut mail, workers) = spawn_with_mail(false).await;
    let node_b = app.second_node().await;
    let email = unique_email("rex");
    let user = sign_up(&app, "Rex Reset", &email, Some(PASSWORD)).await;
    let other = expect_json(Ok(sign_in(&app, json!({ "email": email, "password": PASSWORD })).await), 201).await;
    let tokens = [user["access_token"].as_str().unwrap(), other["access_token"].as_str().unwrap()];
    let status_on =
        |address: &str, token: &str| app.client.get(format!("{address}/v1/sessions")).bearer_auth(token).send();
    for token in tokens {
        assert_eq!(status_on(&app.address, token).await.unwrap().status(), 200);
        assert_eq!(status_on(&node_b.address, token).await.unwrap().status(), 200);
    }

    let response = app.post("/v1/password-resets").json(&json!({ "email": email })).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let message = mail.next_mail(&email, "Reset your Keel password").await;
    assert!(message.contains("valid for 30 minutes"), "{message}");
    let token = reset_token_in(&message);
    assert!(token.starts_with(user["id"].as_str().unwrap()), "the token names the user's shard: {token}");

    let confirm = |token: &str, password: &str| {
        app.post("/v1/password-resets/confirm").json(&json!({ "token": token, "password": password })).send()
    };
    // Refused passwords and made-up tokens: clear answers, and the token still works after them.
    expect_problem(confirm(&token, "password").await, 422, "password").await;
    let (user_part, _) = token.split_once('.').unwrap();
    let made_up = format!("{user_part}.{}", "A".repeat(43));
    for bad in [made_up.as_str(), "garbage", "", "not-a-uuid.secret", &format!("{}.x", uuid::Uuid::now_v7())] {
        expect_problem(confirm(bad, NEW_PASSWORD).await, 401, "not valid").await;
    }
    let reset = confirm(&token, NEW_PASSWORD).await.unwrap();
    assert_eq!(reset.status(), 204, "{}", reset.text().await.unwrap());

    // On this node, at once; on the other, within the session budget.
    for token in tokens {
        expect_problem(status_on(&app.address, token).await, 401, "session has ended").await;
    }
    let refresh = json!({ "refresh_token": user["refresh_token"] });
    expect_problem(app.post("/v1/sessions/refresh").json(&refresh).send().await, 401, "ended").await;
    let budget = Duration::from_secs(5);
    let started = Instant::now();
    for token in tokens {
        while status_on(&node_b.address, token).await.unwrap().status() != 401 {
            assert!(started.elapsed() < budget + Duration::from_secs(2), "still accepted on the other node");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    expect_problem(Ok(sign_in(&app, json!({ "email": email, "password": PASSWORD })).await), 401, "not right").await;
    expect_json(Ok(sign_in(&app, json!({ "email": email, "password": NEW_PASSWORD })).await), 201).await;
    expect_problem(confirm(&token, "another fine passphrase here").await, 401, "not valid").await;
    // The token was read at the address: it is verified.
    let signed_in =
        expect_json(Ok(sign_in(&app, json!({ "email": email, "password": NEW_PASSWORD })).await), 201).await;
    let owner = app.get(&format!("/v1/users/{}", user["id"].as_str().unwrap()));
    let profile = expect_json(owner.bearer_auth(signed_in["access_token"].as_str().unwrap()).send().await, 200).await;
    assert_eq!(profile["email_verified"], true);
    node_b.stop().await;
    stop(&app, workers).await;
}

#[tokio::test]
async fn checkout_waits_for_a_verified_address_and_a_change_of_address_unverifies_it() {
    let (app, mut mail, workers) = spawn_with_mail(true).await;
    let email = unique_email("vera");
    let user = sign_up(&app, "Vera Verify", &email, None).await;
    let (id, token) = (user["id"].as_str().unwrap().to_owned(), user["access_token"].as_str().unwrap().to_owned());
    let profile = || app.get(&format!("/v1/users/{id}")).bearer_auth(&token).send();
    assert_eq!(expect_json(profile().await, 200).await["email_verified"], false);

    // Something to buy, and the money for it.
    let product = app.create_product("VERIFY-1", 700, 5).await;
    let deposit = app.admin(app.post(&format!("/v1/admin/users/{id}/deposits")));
    expect_json(deposit.header("idempotency-key", "d").json(&json!({ "amount_cents": 5000 })).send().await, 201).await;
    let item = json!({ "quantity": 1 });
    expect_json(app.put(&format!("/v1/cart/items/{product}")).bearer_auth(&token).json(&item).send().await, 200).await;
    let checkout =
        |key: &'static str| app.post("/v1/checkout").bearer_auth(&token).header("idempotency-key", key).send();
    expect_problem(checkout("k1").await, 403, "verify your e-mail address before checking out").await;

    // The welcome carries the code.
    let welcome = mail.next_mail(&email, "Welcome to Keel").await;
    let code = code_in(&welcome);
    let verify = |code: String| {
        app.post(&format!("/v1/users/{id}/email-verification"))
            .bearer_auth(&token)
            .json(&json!({ "code": code }))
            .send()
    };
    expect_problem(verify(wrong(&code)).await, 422, "code").await;
    let verified = expect_json(verify(code.clone()).await, 200).await;
    assert_eq!((verified["email_verified"].as_bool(), verified["email"].as_str()), (Some(true), Some(email.as_str())));
    assert_eq!(expect_json(profile().await, 200).await["email_verified"], true);
    expect_problem(verify(code).await, 409, "verified already").await;
    // Others see neither the address nor whether it is verified.
    let (_, stranger) = app.create_user("Stan Stranger").await;
    let public = expect_json(app.get(&format!("/v1/users/{id}")).bearer_auth(&stranger).send().await, 200).await;
    assert!(public.get("email").is_none() && public.get("email_verified").is_none(), "{public}");
    let theirs = app.post(&format!("/v1/users/{id}/email-verification")).bearer_auth(&stranger);
    expect_problem(theirs.json(&json!({ "code": "123456" })).send().await, 403, "owner").await;

    // The key refused before is not spent: it places the order now.
    let accepted = checkout("k1").await.unwrap();
    assert_eq!(accepted.status(), 202, "{}", accepted.text().await.unwrap());

    // A sign-in code sent to the old address before the change: it does not outlive it.
    assert_eq!(ask_code(&app, &email).await.unwrap().status(), 202);
    let old_code = code_in(&mail.next_mail(&email, "Your Keel sign-in code").await);

    // A new address: unverified, the old one free for someone else, the new one taken.
    let new_email = unique_email("vera.new");
    let patch = |body: Value| app.patch(&format!("/v1/users/{id}")).bearer_auth(&token).json(&body).send();
    let changed = expect_json(patch(json!({ "email": new_email.to_uppercase() })).await, 200).await;
    assert_eq!(
        (changed["email"].as_str(), changed["email_verified"].as_bool()),
        (Some(new_email.as_str()), Some(false))
    );
    assert_eq!(expect_json(profile().await, 200).await["email_verified"], false);
    sign_up(&app, "Olive Oldaddress", &email, None).await;
    let taken = json!({ "name": "Nick New", "email": new_email });
    expect_problem(app.post("/v1/users").json(&taken).send().await, 409, "already registered").await;
    expect_problem(patch(json!({ "email": email })).await, 409, "already registered").await;
    expect_problem(patch(json!({ "email": "nope" })).await, 422, "email").await;
    expect_problem(checkout("k2").await, 403, "verify your e-mail address").await;
    let with_old_code = sign_in(&app, json!({ "email": new_email, "code": old_code })).await;
    expect_problem(Ok(with_old_code), 401, "not right").await;
    app.check_invariants().await;

    // The code went to the new address; a resend replaces it.
    let first = code_in(&mail.next_mail(&new_email, "Verify your e-mail address").await);
    let resend = app.post(&format!("/v1/users/{id}/email-verification/resend")).bearer_auth(&token).send().await;
    assert_eq!(resend.unwrap().status(), 202);
    let second = code_in(&mail.next_mail(&new_email, "Verify your e-mail address").await);
    if first != second {
        expect_problem(verify(first).await, 422, "code").await;
    }
    assert_eq!(expect_json(verify(second).await, 200).await["email_verified"], true);
    assert!(
        mail.mails_to(&email).iter().all(|m| !m.contains("Verify your e-mail address")),
        "nothing about the change went to the old address"
    );
    stop(&app, workers).await;
}

#[tokio::test]
async fn an_unknown_address_and_a_wrong_password_get_the_same_answer() {
    let app = TestApp::spawn().await;
    let email = unique_email("sam");
    sign_up(&app, "Sam Same", &email, Some(PASSWORD)).await;
    let answer = |credentials: Value| async {
        let response = sign_in(&app, credentials).await;
        let status = response.status();
        (status, response.json::<Value>().await.unwrap())
    };
    let unknown = answer(json!({ "email": unique_email("nobody"), "password": PASSWORD })).await;
    let wrong_password = answer(json!({ "email": email, "password": "not the password at all" })).await;
    // The problem has no per-request field: the bodies are equal as they are.
    assert_eq!(unknown, wrong_password);
    assert_eq!(unknown.0, 401);
    // And so with a code.
    let unknown = answer(json!({ "email": unique_email("nobody"), "code": "123456" })).await;
    let wrong_code = answer(json!({ "email": email, "code": "123456" })).await;
    assert_eq!(unknown, wrong_code);
    assert_eq!(unknown, wrong_password);
}

/// A failure between the two databases during a change of address can leave the old address
/// claimed by a user whose row no longer has it. Such a claim blocks the address only while it is
/// young (it could be a change in flight); once old enough, a sign-up takes it over.
#[tokio::test]
async fn an_address_left_claimed_by_a_change_is_taken_over_once_old_enough() {
    let app = TestApp::spawn().await;
    let (old, new) = (unique_email("lena"), unique_email("lena.new"));
    let user = sign_up(&app, "Lena Leftover", &old, None).await;
    let (id, token) = (user["id"].as_str().unwrap(), user["access_token"].as_str().unwrap());
    let patch = app.patch(&format!("/v1/users/{id}")).bearer_auth(token).json(&json!({ "email": new }));
    expect_json(patch.send().await, 200).await;

    // As if releasing the old address had failed: its claim is back, with the user.
    let catalog = app.dbs.catalog().await;
    let user_id: uuid::Uuid = id.parse().unwrap();
    let claim = "INSERT INTO user_emails (email, user_id) VALUES ($1, $2)";
    catalog.execute(claim, &[&old, &user_id]).await.unwrap();
    let someone = json!({ "name": "Sol Someone", "email": old });
    expect_problem(app.post("/v1/users").json(&someone).send().await, 409, "already registered").await;
    let aged = "UPDATE user_emails SET claimed_at = now() - interval '3 minutes' WHERE email = $1";
    catalog.execute(aged, &[&old]).await.unwrap();
    let taken_over = expect_json(app.post("/v1/users").json(&someone).send().await, 201).await;
    // The new address is untouched: claimed for its user, whose row has it.
    let new_owner = catalog.query_one("SELECT user_id FROM user_emails WHERE email = $1", &[&new]).await.unwrap();
    assert_eq!(new_owner.get::<_, uuid::Uuid>(0), user_id);
    assert_ne!(taken_over["id"], user["id"]);
    app.check_invariants().await;
}

/// The statuses the rows of the authorization table give these routes, for anonymous, another user,
/// the owner and the admin.
#[tokio::test]
async fn who_may_call_the_e_mail_routes() {
    let app = TestApp::spawn().await;
    let owner = sign_up(&app, "Owen Owner", &unique_email("owen"), None).await;
    let other = sign_up(&app, "Otto Other", &unique_email("otto"), None).await;
    let id = owner["id"].as_str().unwrap();
    let tokens =
        [None, other["access_token"].as_str(), owner["access_token"].as_str(), Some(crate::helpers::ADMIN_TOKEN)];
    let nobody = unique_email("nobody");
    let routes: [(String, Value, [u16; 4]); 5] = [
        ("/v1/sessions/codes".into(), json!({ "email": nobody }), [202; 4]),
        ("/v1/password-resets".into(), json!({ "email": nobody }), [202; 4]),
        ("/v1/password-resets/confirm".into(), json!({ "token": "not-a-token", "password": PASSWORD }), [401; 4]),
        (format!("/v1/users/{id}/email-verification"), json!({ "code": "not-a-code" }), [401, 403, 422, 403]),
        (format!("/v1/users/{id}/email-verification/resend"), json!(null), [401, 403, 202, 403]),
    ];
    for (path, body, expected) in routes {
        for (token, expected) in tokens.iter().zip(expected) {
            let mut request = app.post(&path);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if !body.is_null() {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            assert_eq!(status, expected, "{path} with {token:?}: {}", response.text().await.unwrap());
        }
    }
}
