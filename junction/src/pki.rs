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
    Issue(IssueArgs),
    /// Print certificates or a revocation list for people.
    Inspect {
        /// The PEM file.
        file: PathBuf,
    },
    /// Add certificates or keys to the authority's revocation list.
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
    /// The subject's key file (for an authority: its own key, which also signs).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The subject's public key, as 64 hex digits, when its key file is elsewhere.
    #[arg(long, conflicts_with = "key")]
    public_key: Option<String>,
    /// The issuer's key file (not for an authority).
    #[arg(long)]
    issuer_key: Option<PathBuf>,
    /// The issuer's certificate chain, appended to the new certificate (not for an authority).
    #[arg(long)]
    issuer_cert: Option<PathBuf>,
    /// A name the service may register (repeatable).
    #[arg(long)]
    name: Vec<String>,
    /// A name pattern the intermediate may grant, like 'org.acme.*' (repeatable).
    #[arg(long)]
    pattern: Vec<String>,
    /// The junction's id.
    #[arg(long)]
    junction_id: Option<u16>,
    /// Days of validity from now.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// Valid from this many seconds since the Unix epoch (default: now).
    #[arg(long)]
    not_before: Option<u64>,
    /// Where to write the certificate (PEM); the chain follows it.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// `junction cert revoke`.
#[derive(Debug, clap::Args)]
pub(crate) struct RevokeArgs {
    /// The authority's key.
    #[arg(long)]
    authority_key: PathBuf,
    /// A certificate file whose first certificate to revoke (repeatable).
    #[arg(long)]
    cert: Vec<PathBuf>,
    /// A serial to revoke, in hex or decimal (repeatable).
    #[arg(long)]
    serial: Vec<String>,
    /// A public key (64 hex digits) to revoke outright, e.g. a stolen one (repeatable).
    #[arg(long)]
    public_key: Vec<String>,
    /// The list to extend; it is rewritten with the additions.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

fn random_serial() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(u64::from_be_bytes(b) >> 1)
}

/// Reads a key file.
pub(crate) fn read_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the key {}", path.display()))?;
    SecretKey::from_pem(&text).with_context(|| format!("{} is not a usable key", path.display()))
}

/// Reads a certificate chain file.
pub(crate) fn read_chain(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the certificate {}", path.display()))?;
    Certificate::chain_from_pem(&text)
        .with_context(|| format!("{} holds no usable certificate", path.display()))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// `junction keygen OUT`: a new ed25519 key, PKCS#8 PEM, mode 0600.
pub(crate) fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = SecretKey::generate()?;
    write_private(out, &key.to_pem()?)?;
    println!("{}", key.public());
    eprintln!("wrote {} (public key above)", out.display());
    Ok(())
}

/// `junction cert ...`.
pub(crate) fn cert(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue(args) => issue(args),
        CertCommand::Inspect { file } => inspect(&file),
        CertCommand::Revoke(args) => revoke(args),
    }
}

fn issue(args: IssueArgs) -> anyhow::Result<()> {
    let subject_key = args.key.as_deref().map(read_key).transpose()?;
    let subject = match (&subject_key, &args.public_key) {
        (Some(k), _) => k.public(),
        (None, Some(hex)) => PublicKey::from_hex(hex)?,
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
    let not_after = not_before.saturating_add(args.days.saturating_mul(86_400));
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
            bail!("the --issuer-key does not belong to the first certificate of --issuer-cert");
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
    std::fs::write(&args.out, text)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {}: {} for {}, serial {:#x}",
        args.out.display(),
        cert.body.role,
        cert.body.subject,
        cert.body.serial
    );
    Ok(())
}

fn describe(cert: &Certificate) -> String {
    let b = &cert.body;
    let issuer = if b.issuer == b.subject {
        "itself".to_string()
    } else {
        b.issuer.to_string()
    };
    format!(
        "certificate {:#x}\n  role:       {}\n  subject:    {}\n  issuer:     {}\n  valid:      {} .. {} (seconds since the epoch){}",
        b.serial,
        b.role,
        b.subject,
        issuer,
        b.not_before,
        b.not_after,
        if junction::unix_now() >= b.not_after {
            "  EXPIRED"
        } else if junction::unix_now() < b.not_before {
            "  NOT YET VALID"
        } else {
            ""
        }
    )
}

fn inspect(file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if text.contains(junction_identity::revocation::REVOCATION_LABEL) {
        let list = RevocationList::from_pem(&text)?;
        println!(
            "revocation list number {} issued by {} at {}",
            list.body.number, list.body.issuer, list.body.issued_at
        );
        for s in &list.body.serials {
            println!("  revoked certificate {s:#x}");
        }
        for k in &list.body.keys {
            println!("  revoked key {k}");
        }
        return Ok(());
    }
    let chain = Certificate::chain_from_pem(&text)?;
    for (i, cert) in chain.iter().enumerate() {
        if i > 0 {
            println!("issued by:");
        }
        println!("{}", describe(cert));
    }
    Ok(())
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let authority = read_key(&args.authority_key)?;
    let mut body = match std::fs::read_to_string(&args.out) {
        Ok(text) => {
            let list = RevocationList::from_pem(&text)?;
            if list.body.issuer != authority.public() {
                bail!("{} was issued by another authority", args.out.display());
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
        body.keys.push(PublicKey::from_hex(k)?);
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
        "wrote {}: list number {}, {} certificates and {} keys revoked; send the junction SIGHUP to reload it",
        args.out.display(),
        list.body.number,
        list.body.serials.len(),
        list.body.keys.len()
    );
    Ok(())
}
