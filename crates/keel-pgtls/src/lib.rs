//! How Keel connects to PostgreSQL: libpq's `sslmode` and `sslrootcert`, with rustls.
//!
//! tokio-postgres reads `sslmode=disable|prefer|require` only, and leaves the certificate check to
//! the TLS connector it is given. [`parse`] reads a connection string (URL or `key=value` form)
//! with every mode of libpq's that Keel supports, and returns tokio-postgres's settings with a
//! [`Connector`] that checks what that mode asks for, as libpq does:
//!
//! | `sslmode`     | encrypted                    | server certificate checked                          |
//! |---------------|------------------------------|-----------------------------------------------------|
//! | `disable`     | never                        | —                                                   |
//! | `prefer`      | if the server offers TLS (the default) | no (the chain, if `sslrootcert` is given) |
//! | `require`     | always, or no connection     | no (the chain, if `sslrootcert` is given)           |
//! | `verify-ca`   | always                       | its chain, up to a trusted root                     |
//! | `verify-full` | always                       | its chain, and that it names the host connected to  |
//!
//! Trusted roots: the PEM file `sslrootcert` names; `sslrootcert=system`, the operating system's store;
//! otherwise Mozilla's list (webpki-roots, compiled in, as for webhook deliveries). `allow`, client
//! certificates (`sslcert`, `sslkey`) and channel binding are not supported (SCRAM authentication works
//! over TLS without binding; `channel_binding=require` fails). Unix-socket connections are never
//! encrypted (PostgreSQL does not offer TLS on them), whatever the mode.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`, as far as Keel supports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// What is checked of the server's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Nothing,
    Chain,
    ChainAndHost,
}

/// A connection string that cannot be used: the message names the parameter.
#[derive(Debug)]
pub enum Error {
    /// Rejected by tokio-postgres (after the TLS parameters were taken out).
    Config(tokio_postgres::Error),
    /// A TLS parameter with a value Keel cannot use.
    Parameter { parameter: &'static str, detail: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Parameter { parameter, detail } => write!(f, "{parameter}: {detail}"),
        }
    }
}

impl std::error::Error for Error {}

/// The TLS side of a connection string: what [`parse`] took out of it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct TlsParameters {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

/// tokio-postgres's settings for `url`, with the connector its `sslmode` calls for.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Connector), Error> {
    let (rest, tls) = take_tls_parameters(url);
    let mode = match tls.sslmode.as_deref() {
        None | Some("prefer") => Mode::Prefer,
        Some("disable") => Mode::Disable,
        Some("require") => Mode::Require,
        Some("verify-ca") => Mode::VerifyCa,
        Some("verify-full") => Mode::VerifyFull,
        Some(other) => {
            return Err(Error::Parameter {
                parameter: "sslmode",
                detail: format!("{other:?} is not supported (disable, prefer, require, verify-ca or verify-full)"),
            })
        }
    };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(Error::Config)?;
    // PostgreSQL offers no TLS on Unix sockets: connections there stay plain, as with libpq.
    let unix_only = !config.get_hosts().is_empty() && config.get_hosts().iter().all(|h| !matches!(h, Host::Tcp(_)));
    let mode = if unix_only { Mode::Disable } else { mode };
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    let check = match (mode, &tls.sslrootcert) {
        (Mode::VerifyFull, _) => Check::ChainAndHost,
        (Mode::VerifyCa, _) => Check::Chain,
        // libpq: with a root certificate given, `prefer` and `require` check the chain too.
        (Mode::Prefer | Mode::Require, Some(_)) => Check::Chain,
        _ => Check::Nothing,
    };
    let client = match mode {
        Mode::Disable => None,
        _ => Some(client_config(check, tls.sslrootcert.as_deref())?),
    };
    let roots = match tls.sslrootcert.as_deref() {
        None => "Mozilla's roots (no sslrootcert given)".to_owned(),
        Some("system") => "the system's roots (sslrootcert=system)".to_owned(),
        Some(path) => format!("sslrootcert {path}"),
    };
    Ok((config, Connector { client, mode, roots: roots.into() }))
}

fn client_config(check: Check, sslrootcert: Option<&str>) -> Result<Arc<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Nothing => Arc::new(AnyCertificate(provider)),
        Check::Chain | Check::ChainAndHost => {
            let roots = roots(sslrootcert)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Parameter { parameter: "sslrootcert", detail: e.to_string() })?;
            if check == Check::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok(Arc::new(config))
}

fn roots(sslrootcert: Option<&str>) -> Result<RootCertStore, Error> {
    let bad = |detail: String| Error::Parameter { parameter: "sslrootcert", detail };
    let mut store = RootCertStore::empty();
    match sslrootcert {
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some("system") => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(bad(format!("system: no certificate found in the system's store ({:?})", found.errors)));
            }
        }
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("cannot read {path}: {e}")))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad(format!("{path} holds no usable PEM certificate")));
            }
        }
    }
    Ok(store)
}

/// Splits the `sslmode` and `sslrootcert` parameters off a connection string, in either form.
fn take_tls_parameters(url: &str) -> (String, TlsParameters) {
    let mut tls = TlsParameters::default();
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            tls.sslmode = Some(value);
            true
        }
        "sslrootcert" => {
            tls.sslrootcert = Some(value);
            true
        }
        _ => false,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), tls) };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key, percent_decode(value))
            })
            .collect();
        let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
        (rest, tls)
    } else {
        let Some(pairs) = key_value_pairs(url) else { return (url.to_owned(), tls) };
        let kept: Vec<String> = pairs
            .into_iter()
            .filter_map(|(key, value)| {
                (!take(&key, value.clone()))
                    .then(|| format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")))
            })
            .collect();
        (kept.join(" "), tls)
    }
}

/// The pairs of a `key=value` connection string, or `None` if it is malformed (tokio-postgres then
/// says what is wrong with it).
fn key_value_pairs(s: &str) -> Option<Vec<(String, String)>> {
    let mut chars = s.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Accepts any certificate (`prefer` and `require` without `sslrootcert`: encryption against
/// eavesdropping, not against an impostor — libpq's meaning of those modes), but still checks that
/// the server holds the certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the names in the certificate do not matter.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked first: a name mismatch is all that is left when it is reported.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The TLS connector of one connection string ([`parse`]); cheap to clone.
#[derive(Clone)]
pub struct Connector {
    client: Option<Arc<ClientConfig>>,
    mode: Mode,
    /// Where trusted roots come from, for error messages.
    roots: Arc<str>,
}

impl Connector {
    pub fn mode(&self) -> Mode {
        self.mode
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector").field("mode", &self.mode).finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for Connector {
    type Stream = TlsStream<S>;
    type TlsConnect = Handshake;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<Handshake, io::Error> {
        // An empty host is a Unix socket's: no TLS is offered there, so no handshake happens.
        let name = ServerName::try_from(host.to_owned()).ok();
        Ok(Handshake {
            client: self.client.clone(),
            name,
            host: host.to_owned(),
            mode: self.mode,
            roots: self.roots.clone(),
        })
    }
}

/// One connection's TLS handshake.
pub struct Handshake {
    client: Option<Arc<ClientConfig>>,
    name: Option<ServerName<'static>>,
    host: String,
    mode: Mode,
    roots: Arc<str>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Handshake {
    type Stream = TlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let failed = |detail: String| {
                io::Error::other(format!("TLS with {} failed (sslmode={}): {detail}", self.host, self.mode.as_str()))
            };
            let client = self.client.ok_or_else(|| failed("TLS is disabled".to_owned()))?;
            let name = self.name.ok_or_else(|| failed("not a host name or IP address".to_owned()))?;
            let stream = tokio_rustls::TlsConnector::from(client).connect(name, stream).await.map_err(|e| {
                let hint = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                        format!(" (the certificate is not signed by a root in {})", self.roots)
                    }
                    Some(rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                    )) => " (the certificate does not name the host connected to, which verify-full requires; \
                            verify-ca checks its chain only)"
                        .to_owned(),
                    _ => String::new(),
                };
                failed(format!("{e}{hint}"))
            })?;
            Ok(TlsStream(stream))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    /// None: `tls-server-end-point` hashes the certificate with its signature's hash, which would
    /// mean parsing it; a wrong binding fails authentication, none only forgoes SCRAM's `-PLUS`.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// Connects outside a pool (a `LISTEN` connection, a maintenance connection) with the TLS policy of
/// `url`; the connection must be polled (spawned) for the client to work.
pub async fn connect(
    url: &str,
) -> Result<
    (tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, TlsStream<tokio_postgres::Socket>>),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let (config, connector) = parse(url)?;
    config.connect(connector).await.map_err(|e| {
        // tokio-postgres leaves a TLS failure's reason to `source()`: show it.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        text.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Option<String>, Option<String>) {
        let (rest, tls) = take_tls_parameters(url);
        (rest, tls.sslmode, tls.sslrootcert)
    }

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        assert_eq!(
            split("postgres://k:p@db.example.org:5432/x?sslmode=verify-full&application_name=a&sslrootcert=%2Fetc%2Fca.pem"),
            (
                "postgres://k:p@db.example.org:5432/x?application_name=a".to_owned(),
                Some("verify-full".to_owned()),
                Some("/etc/ca.pem".to_owned())
            )
        );
        assert_eq!(split("postgresql://db/x?sslmode=require").0, "postgresql://db/x");
        assert_eq!(split("postgres://db/x").1, None);
    }

    #[test]
    fn tls_parameters_are_taken_out_of_key_value_strings() {
        let (rest, mode, root) = split("host=db.example.org sslmode = verify-ca sslrootcert='/a b/c\\'s.pem' dbname=x");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root.as_deref(), Some("/a b/c's.pem"));
        assert_eq!(rest, "host='db.example.org' dbname='x'");
        let config = tokio_postgres::Config::from_str(&rest).unwrap();
        assert_eq!(config.get_dbname(), Some("x"));
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |url: &str| parse(url).map(|(config, c)| (c.mode(), config.get_ssl_mode()));
        assert_eq!(mode("postgres://db/x").unwrap(), (Mode::Prefer, SslMode::Prefer));
        assert_eq!(mode("postgres://db/x?sslmode=disable").unwrap(), (Mode::Disable, SslMode::Disable));
        assert_eq!(mode("postgres://db/x?sslmode=require").unwrap(), (Mode::Require, SslMode::Require));
        assert_eq!(mode("postgres://db/x?sslmode=verify-ca").unwrap(), (Mode::VerifyCa, SslMode::Require));
        assert_eq!(mode("host=db sslmode=verify-full").unwrap(), (Mode::VerifyFull, SslMode::Require));
        // Unix sockets stay plain whatever the mode.
        assert_eq!(mode("host=/run/postgresql sslmode=verify-full").unwrap(), (Mode::Disable, SslMode::Disable));
        assert_eq!(
            mode("postgres://%2Frun%2Fpostgresql/x?sslmode=require").unwrap(),
            (Mode::Disable, SslMode::Disable)
        );
        let error = mode("postgres://db/x?sslmode=allow").unwrap_err().to_string();
        assert!(error.starts_with("sslmode: \"allow\" is not supported"), "{error}");
        let error = mode("postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent.pem").unwrap_err().to_string();
        assert!(error.starts_with("sslrootcert: cannot read /nonexistent.pem"), "{error}");
    }
}
