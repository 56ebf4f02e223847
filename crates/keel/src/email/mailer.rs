//! Outgoing e-mail: over SMTP with lettre when `KEEL_SMTP_URL` is set, otherwise written as `.eml`
//! files under `DATA_DIR/mail/` (so `keel up` works with no mail server and the messages can still
//! be read). A message's `Message-ID` comes from the event that caused it: a message sent again
//! after a crash is recognisably the same message, and a file is simply written over.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use uuid::Uuid;

use crate::config::Config;

/// One message to one person.
#[derive(Debug, Clone)]
pub struct Mail {
    pub to: Mailbox,
    pub subject: String,
    pub body: String,
}

/// Why a message was not sent.
#[derive(Debug)]
pub struct MailError {
    pub message: String,
    /// The mail server refused it for good (a 5xx answer: no such recipient, say); sending it
    /// again cannot succeed. Otherwise the failure may pass (a 4xx, a connection lost).
    pub permanent: bool,
}

impl MailError {
    fn transient(message: String) -> MailError {
        MailError { message, permanent: false }
    }
}

pub enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Directory(PathBuf),
}

impl Mailer {
    pub fn from_config(config: &Config) -> Result<Mailer, String> {
        match &config.smtp_url {
            Some(url) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| format!("KEEL_SMTP_URL: {e}"))?
                    .timeout(Some(Duration::from_secs(10)))
                    .build();
                Ok(Mailer::Smtp(transport))
            }
            None => Ok(Mailer::Directory(config.data_dir.join("mail"))),
        }
    }

    /// Sends `mail` as the message of event `event_id`.
    pub async fn send(&self, event_id: Uuid, from: &Mailbox, mail: Mail) -> Result<(), MailError> {
        let message = Message::builder()
            .from(from.clone())
            .to(mail.to)
            .subject(mail.subject)
            .message_id(Some(format!("<{event_id}@keel>")))
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body)
            .map_err(|e| MailError { message: format!("cannot build the message: {e}"), permanent: true })?;
        match self {
            Mailer::Smtp(transport) => {
                transport
                    .send(message)
                    .await
                    .map_err(|e| MailError { message: format!("SMTP: {e}"), permanent: e.is_permanent() })?;
            }
            Mailer::Directory(dir) => {
                write_file(dir, event_id, &message.formatted()).await.map_err(MailError::transient)?
            }
        }
        Ok(())
    }
}

/// Writes the message whole or not at all: to a temporary name, then renamed. Readable by Keel's
/// user only (the directory 700, the files 600): messages carry names, addresses and orders.
async fn write_file(dir: &std::path::Path, event_id: Uuid, bytes: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(dir).await.map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // A directory made by an older Keel, with the default mode.
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(|e| format!("cannot make {} private: {e}", dir.display()))?;
    let path = dir.join(format!("{event_id}.eml"));
    let partial = dir.join(format!(".{event_id}.eml.partial"));
    let write = async {
        let mut file =
            tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial).await?;
        file.write_all(bytes).await?;
        file.flush().await
    };
    write.await.map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    tokio::fs::rename(&partial, &path).await.map_err(|e| format!("cannot write {}: {e}", path.display()))
}
