//! `sign` and `verify`: the signature of a body, and a signature checked against a body, with the
//! same canonicalisation flags so that what `sign` prints `verify` accepts.

use clap::Args;

use crate::cli::{AcceptArg, CanonicalArgs, SecretArg, SignEncoding, mask, parse, read_body};
use crate::verify::diagnose;
use crate::verify::signature::{self, Encoding};

#[derive(Debug, Args)]
pub struct SignArgs {
    #[command(flatten)]
    secret: SecretArg,
    /// Print the string to sign, with the secret masked, instead of the signature.
    #[arg(long)]
    explain: bool,
    /// How the md5 digest is encoded in the signature.
    #[arg(long, value_enum, default_value = "hex", value_name = "ENCODING")]
    encoding: SignEncoding,
    #[command(flatten)]
    canonical: CanonicalArgs,
    /// The body, or `-` (the default) for standard input. JSON when it starts with `{`,
    /// otherwise form-urlencoded.
    #[arg(value_name = "BODY")]
    body: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    secret: SecretArg,
    /// The x-lf-md5 value to check.
    #[arg(long, value_name = "SIGNATURE")]
    signature: String,
    /// Which digest encodings to accept, as [verify] signature_encoding.
    #[arg(long, value_enum, default_value = "auto", value_name = "ENCODING")]
    encoding: AcceptArg,
    #[command(flatten)]
    canonical: CanonicalArgs,
    /// Also print the string to sign, with the secret masked.
    #[arg(long)]
    explain: bool,
    /// The body, or `-` (the default) for standard input. JSON when it starts with `{`,
    /// otherwise form-urlencoded.
    #[arg(value_name = "BODY")]
    body: Option<String>,
}

/// `sign`: prints the signature, or with `--explain` the string to sign with the secret masked.
pub fn sign(args: &SignArgs) -> Result<(), String> {
    let secret = args.secret.resolve()?;
    let raw = read_body(args.body.as_deref())?;
    let body = parse(&raw)?;
    let canonical = args.canonical.canonical(&body);
    if args.explain {
        println!("{}", signature::string_to_sign(&canonical, &mask(&secret)));
    } else {
        println!(
            "{}",
            signature::sign(&canonical, &secret, args.encoding.into())
        );
    }
    // Signed all the same: a test may want a correctly signed body that lfguard refuses.
    if let Err(why) = crate::verify::ambiguity::check(&body, args.canonical.nested_values.into()) {
        eprintln!("lfguard: note: lfguard refuses this body whatever its signature: {why}");
    }
    Ok(())
}

/// `verify`: `Ok(true)` when the signature matches. On a mismatch, the documented variants are
/// tried and the settings that would accept the body are printed.
pub fn verify(args: &VerifyArgs) -> Result<bool, String> {
    let secret = args.secret.resolve()?;
    let raw = read_body(args.body.as_deref())?;
    let body = parse(&raw)?;
    let settings = diagnose::Settings {
        encoding: args.encoding.into(),
        nulls: args.canonical.null_values.into(),
        nested: args.canonical.nested_values.into(),
    };
    let canonical = args.canonical.canonical(&body);
    if args.explain {
        println!(
            "string to sign: {}",
            signature::string_to_sign(&canonical, &mask(&secret))
        );
    }
    // lfguard refuses such a body whatever its signature, so `verify` does too.
    if let Err(why) = crate::verify::ambiguity::check(&body, settings.nested) {
        println!("invalid: ambiguous body: {why}");
        return Ok(false);
    }
    let header = args.signature.trim().as_bytes();
    if let Some(claimed) = signature::decode_header(header, settings.encoding)
        && claimed.matches(&signature::Prepared::new(&canonical).digest(&secret))
    {
        let encoding = match claimed {
            signature::Claimed::Raw(_) => "raw",
            signature::Claimed::Hex(_) => "hex",
        };
        println!("valid ({encoding} digest encoding)");
        return Ok(true);
    }
    if signature::decode_header(header, Encoding::Auto).is_none() {
        println!("invalid: the signature is not base64 of an md5 digest (hex or raw)");
        return Ok(false);
    }
    match diagnose::find_variant(&body, header, &[secret.as_str()], settings) {
        Some(variant) => println!(
            "invalid with these settings, but valid with {}; to accept it, set in [verify]:\n{}",
            variant.name(),
            variant.config_fix()
        ),
        None => println!(
            "invalid: the signature does not match this body and secret under any documented variant"
        ),
    }
    Ok(false)
}
