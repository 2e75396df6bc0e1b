//! `junction keygen` and `junction cert`: an operator's tools for a bus's
//! keys, certificates and revocation lists.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use junction_identity::{
    CertBody, Certificate, NamePattern, PublicKey, RevocationBody, RevocationList, Role, SecretKey,
    ServiceName,
};

/// `junction cert ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertCommand {
    /// Issue a certificate (a self-issued one for an authority).
    #[command(after_help = "\
EXAMPLES:
  junction cert issue --role authority --key authority.key -o authority.cert
  junction cert issue --role service --name org.acme.echo --key echo.key \\
      --issuer-key authority.key --issuer-cert authority.cert -o echo.cert
  junction cert issue --role client --key alice.key --not-before 2026-12-01 --days 30 \\
      --issuer-key authority.key --issuer-cert authority.cert -o alice.cert")]
    Issue(IssueArgs),
    /// Print certificates or a revocation list for people (or as JSON).
    ///
    /// For a chain that ends at a self-issued authority, it also says
    /// whether the chain verifies against that authority now.
    #[command(after_help = "\
EXAMPLES:
  junction cert inspect echo.cert
  junction cert inspect revoked.crl
  junction cert inspect echo.cert --json | jq '.[0].not_after'")]
    Inspect {
        /// The PEM file: certificates (a chain, leaf first) or a revocation list.
        file: PathBuf,
        /// Print JSON instead of text: an array of certificates, or the list.
        #[arg(long)]
        json: bool,
    },
    /// Add certificates or keys to the authority's revocation list.
    #[command(after_help = "\
EXAMPLES:
  junction cert revoke --authority-key authority.key -o revoked.crl     # an empty list
  junction cert revoke --authority-key authority.key --cert greeter.cert -o revoked.crl
  junction cert revoke --authority-key authority.key --serial 0x1f2e -o revoked.crl

Then have the junction reload the list: send it SIGHUP.")]
    Revoke(RevokeArgs),
}

/// The role to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RoleArg {
    /// The bus's root of trust (self-issued).
    Authority,
    /// May issue within name patterns (--pattern).
    Intermediate,
    /// A junction with its id (--junction-id).
    Junction,
    /// A service with the names it may register (--name).
    Service,
    /// A client: proves who it is, registers nothing.
    Client,
}

/// `junction cert issue`.
#[derive(Debug, clap::Args)]
pub(crate) struct IssueArgs {
    /// What the subject may be.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// The subject's key file (for an authority: its own key, which also
    /// signs) [default: none: give --public-key].
    #[arg(long)]
    key: Option<PathBuf>,
    /// The subject's public key, as 64 hex digits, when its key file is
    /// elsewhere [default: none: give --key].
    #[arg(long, conflicts_with = "key")]
    public_key: Option<String>,
    /// The issuer's key file (not for an authority) [default: none].
    #[arg(long)]
    issuer_key: Option<PathBuf>,
    /// The issuer's certificate chain, appended to the new certificate
    /// (not for an authority) [default: none].
    #[arg(long)]
    issuer_cert: Option<PathBuf>,
    /// A name the service may register (repeatable) [default: none].
    #[arg(long)]
    name: Vec<String>,
    /// A name pattern the intermediate may grant, like 'org.acme.*'
    /// (repeatable) [default: none].
    #[arg(long)]
    pattern: Vec<String>,
    /// The junction's id, 1 to 65534 (for --role junction) [default: none].
    #[arg(long)]
    junction_id: Option<u16>,
    /// Days of validity from --not-before.
    #[arg(long, default_value_t = 365, conflicts_with = "not_after")]
    days: u64,
    /// Valid from: a date (2026-12-01), a UTC time (2026-12-01 10:00,
    /// 2026-12-01T10:00:00Z), or seconds since the Unix epoch [default: a
    /// minute ago, for clocks a little behind].
    #[arg(long, value_parser = crate::when::instant)]
    not_before: Option<u64>,
    /// Valid until, written as --not-before is [default: --days after
    /// --not-before].
    #[arg(long, value_parser = crate::when::instant)]
    not_after: Option<u64>,
    /// Where to write the certificate (PEM); the chain follows it.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// `junction cert revoke`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevokeArgs {
    /// The authority's key.
    #[arg(long)]
    authority_key: PathBuf,
    /// A certificate file whose first certificate to revoke (repeatable)
    /// [default: none].
    #[arg(long)]
    cert: Vec<PathBuf>,
    /// A serial to revoke, in hex or decimal (repeatable) [default: none].
    #[arg(long)]
    serial: Vec<String>,
    /// A public key (64 hex digits) to revoke outright, e.g. a stolen one
    /// (repeatable) [default: none].
    #[arg(long)]
    public_key: Vec<String>,
    /// The list to extend; it is rewritten with the additions.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// A public key given on the command line, as 64 hex digits.
fn parse_public_key(option: &str, hex: &str) -> anyhow::Result<PublicKey> {
    PublicKey::from_hex(hex).map_err(|_| {
        anyhow::anyhow!(
            "{option} {hex:?} is not a public key: give 64 hex digits, as `junction keygen` \
             prints (or `junction cert inspect` shows as subject)"
        )
    })
}

fn random_serial() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(u64::from_be_bytes(b) >> 1)
}

/// Reads a key file.
pub(crate) fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the key {}: {e}", path.display()))?;
    SecretKey::from_pem(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is {e}; give a key made by `junction keygen` (or openssl genpkey -algorithm ed25519)",
            path.display()
        )
    })
}

/// Reads a certificate chain file.
pub(crate) fn read_chain(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the certificate {}: {e}", path.display()))?;
    Certificate::chain_from_pem(&text).map_err(|e| not_a_certificate(path, &e))
}

/// The error for a file that should hold certificates and does not.
fn not_a_certificate(path: &Path, e: &junction_identity::IdentityError) -> anyhow::Error {
    anyhow::anyhow!(
        "{} is {e}; give a certificate file made by `junction cert issue`, \
         or issue it again if it was damaged",
        path.display()
    )
}

/// Writes a new file with `mode` (0600 for keys; certificates are public);
/// replaces an existing one only if `force`.
fn write_new(path: &Path, text: &str, force: bool, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if force {
        // A new file rather than the old one rewritten: the old one may be
        // readable by others, and the mode is only set at creation.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("cannot replace {}: {e}", path.display()),
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} exists already; give another file, or --force to replace it",
                    path.display()
                )
            } else {
                anyhow::anyhow!("cannot create {}: {e}", path.display())
            }
        })?;
    file.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// `junction keygen OUT`: a new ed25519 key, PKCS#8 PEM, mode 0600.
pub(crate) fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    write_new(out, &key.to_pem()?, force, 0o600)?;
    println!("{}", key.public());
    eprintln!("wrote {} (public key above)", out.display());
    Ok(())
}

/// `junction cert ...`.
pub(crate) fn cert(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue(args) => issue(args),
        CertCommand::Inspect { file, json } => inspect(&file, json),
        CertCommand::Revoke(args) => revoke(args),
    }
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let subject_key = args.key.as_deref().map(read_key).transpose()?;
    let subject = match (&subject_key, &args.public_key) {
        (Some(k), _) => k.public(),
        (None, Some(hex)) => parse_public_key("--public-key", hex)?,
        (None, None) => bail!("give the subject's --key file or its --public-key"),
    };
    let role = match args.role {
        RoleArg::Authority => Role::Authority,
        RoleArg::Intermediate => {
            if args.pattern.is_empty() {
                bail!("an intermediate needs at least one --pattern, like 'org.acme.*'");
            }
            Role::Intermediate {
                patterns: args
                    .pattern
                    .iter()
                    .map(|p| p.parse::<NamePattern>())
                    .collect::<Result<_, _>>()?,
            }
        }
        RoleArg::Junction => Role::Junction {
            id: junction::config::check_junction_id(
                args.junction_id
                    .context("a junction certificate needs --junction-id")?,
            )?,
        },
        RoleArg::Service => {
            if args.name.is_empty() {
                bail!("a service certificate needs at least one --name");
            }
            Role::Service {
                names: args
                    .name
                    .iter()
                    .map(|n| n.parse::<ServiceName>())
                    .collect::<Result<_, _>>()?,
            }
        }
        RoleArg::Client => Role::Client,
    };
    let not_before = args
        .not_before
        .unwrap_or_else(|| junction::unix_now().saturating_sub(60));
    let not_after = args
        .not_after
        .unwrap_or_else(|| not_before.saturating_add(args.days.saturating_mul(86_400)));
    if not_after <= not_before {
        bail!(
            "--not-after {} is not after --not-before {}; give a later --not-after",
            junction_identity::when::utc(not_after),
            junction_identity::when::utc(not_before)
        );
    }
    // Refused before anything is signed, so a mistake costs nothing.
    if args.out.exists() && !args.force {
        bail!(
            "{} exists already; give another file, or --force to replace it",
            args.out.display()
        );
    }
    let (issuer, chain) = if args.role == RoleArg::Authority {
        let key =
            subject_key.context("an authority certificate needs the authority's own --key")?;
        (key, Vec::new())
    } else {
        let key = read_key(
            args.issuer_key
                .as_deref()
                .context("give the --issuer-key that signs")?,
        )?;
        let chain = read_chain(
            args.issuer_cert
                .as_deref()
                .context("give the --issuer-cert (the issuer's certificate chain)")?,
        )?;
        if chain[0].body.subject != key.public() {
            bail!(
                "the --issuer-key does not belong to the first certificate of --issuer-cert \
                 (it was issued for key {}); give the key it was issued for",
                chain[0].body.subject
            );
        }
        (key, chain)
    };
    let body = CertBody {
        version: 1,
        serial: random_serial()?,
        subject,
        role,
        not_before,
        not_after,
        issuer: issuer.public(),
    };
    let cert = Certificate::issue(body, &issuer)?;
    let mut text = cert.to_pem();
    for c in &chain {
        text.push_str(&c.to_pem());
    }
    write_new(&args.out, &text, args.force, 0o644)?;
    eprintln!(
        "wrote {}: {} for {}, serial {:#x}, valid {} to {}",
        args.out.display(),
        cert.body.role,
        cert.body.subject,
        cert.body.serial,
        junction_identity::when::utc(cert.body.not_before),
        junction_identity::when::utc(cert.body.not_after),
    );
    Ok(())
}

fn describe(cert: &Certificate, now: u64) -> String {
    use junction_identity::when::dated;
    let b = &cert.body;
    let issuer = if b.issuer == b.subject {
        "itself".to_string()
    } else {
        b.issuer.to_string()
    };
    let state = if now >= b.not_after {
        "  EXPIRED"
    } else if now < b.not_before {
        "  NOT YET VALID"
    } else {
        ""
    };
    format!(
        "certificate {:#x}\n  role:       {}\n  subject:    {}\n  issuer:     {}\n  valid from: {}\n  expires:    {}{state}",
        b.serial,
        b.role,
        b.subject,
        issuer,
        dated(b.not_before, now),
        dated(b.not_after, now),
    )
}

/// Whether `chain` verifies against its own last certificate, when that
/// is a self-issued authority: `None` when there is no such authority to
/// check against (a chain cut before its authority).
fn self_check(chain: &[Certificate], now: u64) -> Option<Result<(), String>> {
    let last = chain.last()?;
    if last.body.role != Role::Authority || last.body.issuer != last.body.subject {
        return None;
    }
    let mut trust = junction_identity::TrustStore::new();
    Some(
        trust
            .add_authority(last)
            .and_then(|()| {
                if chain.len() == 1 {
                    Ok(())
                } else {
                    trust
                        .verify_chain(&chain[..chain.len() - 1], now, None)
                        .map(|_| ())
                }
            })
            .map_err(|e| e.to_string()),
    )
}

fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    use junction_identity::when::utc;
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let now = junction::unix_now();
    if text.contains(junction_identity::revocation::REVOCATION_LABEL) {
        let list = RevocationList::from_pem(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is {e}; make revocation lists with `junction cert revoke`",
                file.display()
            )
        })?;
        if json {
            let value = serde_json::json!({
                "revocation_list": list.body.number,
                "issuer": list.body.issuer.to_string(),
                "issued_at": list.body.issued_at,
                "issued_at_utc": utc(list.body.issued_at),
                "serials": list.body.serials.iter().map(|s| format!("{s:#x}")).collect::<Vec<_>>(),
                "keys": list.body.keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            });
            println!("{value}");
            return Ok(());
        }
        println!(
            "revocation list number {} issued by {} at {}",
            list.body.number,
            list.body.issuer,
            junction_identity::when::dated(list.body.issued_at, now)
        );
        for s in &list.body.serials {
            println!("  revoked certificate {s:#x}");
        }
        for k in &list.body.keys {
            println!("  revoked key {k}");
        }
        return Ok(());
    }
    let chain = Certificate::chain_from_pem(&text).map_err(|e| not_a_certificate(file, &e))?;
    let check = self_check(&chain, now);
    if json {
        let certs: Vec<serde_json::Value> = chain
            .iter()
            .map(|c| {
                let b = &c.body;
                let (kind, names, patterns, junction_id) = match &b.role {
                    Role::Authority => ("authority", vec![], vec![], None),
                    Role::Intermediate { patterns } => (
                        "intermediate",
                        vec![],
                        patterns.iter().map(|p| p.to_string()).collect(),
                        None,
                    ),
                    Role::Junction { id } => ("junction", vec![], vec![], Some(*id)),
                    Role::Service { names } => (
                        "service",
                        names.iter().map(|n| n.to_string()).collect(),
                        vec![],
                        None,
                    ),
                    Role::Client => ("client", vec![], vec![], None),
                };
                serde_json::json!({
                    "serial": format!("{:#x}", b.serial),
                    "role": kind,
                    "names": names,
                    "patterns": patterns,
                    "junction_id": junction_id,
                    "subject": b.subject.to_string(),
                    "issuer": b.issuer.to_string(),
                    "not_before": b.not_before,
                    "not_after": b.not_after,
                    "not_before_utc": utc(b.not_before),
                    "not_after_utc": utc(b.not_after),
                    "expired": now >= b.not_after,
                    "not_yet_valid": now < b.not_before,
                })
            })
            .collect();
        let value = serde_json::json!({
            "certificates": certs,
            "verifies_against_its_authority": check.as_ref().map(|r| r.is_ok()),
            "problem": check.as_ref().and_then(|r| r.as_ref().err()),
        });
        println!("{value}");
        return Ok(());
    }
    for (i, cert) in chain.iter().enumerate() {
        if i > 0 {
            println!("issued by:");
        }
        println!("{}", describe(cert, now));
    }
    match check {
        Some(Ok(())) => println!("check: the chain verifies against its authority, now"),
        Some(Err(e)) => println!("check: DOES NOT VERIFY against its authority: {e}"),
        None => {}
    }
    Ok(())
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let authority = read_key(&args.authority_key)?;
    let mut body = match std::fs::read_to_string(&args.out) {
        Ok(text) => {
            let list = RevocationList::from_pem(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{} is {e}; -o names the revocation list to extend (or a new file)",
                    args.out.display()
                )
            })?;
            if list.body.issuer != authority.public() {
                bail!(
                    "{} was issued by another authority than --authority-key; give that \
                     authority's key, or a new file",
                    args.out.display()
                );
            }
            list.body
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => RevocationBody {
            issuer: authority.public(),
            number: 0,
            issued_at: 0,
            serials: Vec::new(),
            keys: Vec::new(),
        },
        Err(e) => bail!("cannot read {}: {e}", args.out.display()),
    };
    for path in &args.cert {
        body.serials.push(read_chain(path)?[0].body.serial);
    }
    for s in &args.serial {
        let serial = match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .with_context(|| format!("{s:?} is not a serial (hex with 0x, or decimal)"))?;
        body.serials.push(serial);
    }
    for k in &args.public_key {
        body.keys.push(parse_public_key("--public-key", k)?);
    }
    body.serials.sort_unstable();
    body.serials.dedup();
    body.keys.sort();
    body.keys.dedup();
    // Junctions take a list only if its number is above the one in force;
    // the time alone cannot order two lists made in the same second.
    body.number = body.number.checked_add(1).with_context(|| {
        format!(
            "{} has the highest possible number; start a new list signed by a new authority key",
            args.out.display()
        )
    })?;
    body.issued_at = junction::unix_now();
    let list = RevocationList::issue(body, &authority)?;
    std::fs::write(&args.out, list.to_pem())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {}: revocation list number {}, {} certificates and {} keys revoked; send the junction SIGHUP to reload it",
        args.out.display(),
        list.body.number,
        list.body.serials.len(),
        list.body.keys.len()
    );
    Ok(())
}
