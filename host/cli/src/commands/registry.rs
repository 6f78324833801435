//! What `sandgate push` and `sandgate pull` share: how to reach the registry.

use anyhow::Context;
use sandgate_registry::{Credentials, ModuleRef, Registry, RegistrySettings};
use std::path::PathBuf;

/// Registry connection flags.
#[derive(clap::Args)]
pub struct RegistryArgs {
    /// Take the `[registry]` settings (credentials, CA, plain-HTTP hosts, cache) from a
    /// sidecar configuration file; the flags below add to them. (`replay` also takes its
    /// `[runtime]` limits.)
    #[arg(long)]
    config: Option<PathBuf>,
    /// User name for the registry (the password from `--password-stdin` or
    /// `SANDGATE_REGISTRY_PASSWORD`).
    #[arg(long)]
    username: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// Extra trusted root certificates (PEM) for a registry with a private CA.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Speak plain HTTP to this registry (loopback registries use it unless `--tls`).
    #[arg(long)]
    plain_http: bool,
    /// Speak TLS even to a loopback registry.
    #[arg(long, conflicts_with = "plain_http")]
    tls: bool,
    /// Require a cosign signature by this public key (PEM) over the manifest digest (pull).
    #[arg(long)]
    cosign_key: Vec<PathBuf>,
    /// The password, once read (standard input is read once, however many registries follow).
    #[arg(skip)]
    password: std::sync::OnceLock<String>,
}

impl RegistryArgs {
    /// Whether the password is read from standard input.
    pub fn reads_stdin(&self) -> bool {
        self.password_stdin
    }

    /// The sidecar configuration file given with `--config`.
    pub fn config(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// A registry client for `reference`'s registry.
    pub fn registry(&self, reference: &ModuleRef, cache_dir: Option<PathBuf>) -> anyhow::Result<Registry> {
        let settings = match &self.config {
            Some(path) => {
                sandgate_server::state::registry_settings(&sandgate_server::Config::from_file(path)?.registry)?
            }
            None => RegistrySettings::default(),
        };
        self.extend(settings, reference, cache_dir)
    }

    fn extend(
        &self,
        mut settings: RegistrySettings,
        reference: &ModuleRef,
        cache_dir: Option<PathBuf>,
    ) -> anyhow::Result<Registry> {
        let host = reference.registry().to_owned();
        if let Some(username) = &self.username {
            let password = match self.password.get() {
                Some(password) => password.clone(),
                None => {
                    let read = super::password(self.password_stdin, "SANDGATE_REGISTRY_PASSWORD", "--username")?;
                    self.password.get_or_init(|| read).clone()
                }
            };
            settings.credentials.insert(host.clone(), Credentials::Basic { username: username.clone(), password });
        }
        if let Some(path) = &self.ca_file {
            settings.ca_pem.push(std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?);
        }
        for path in &self.cosign_key {
            settings
                .cosign_keys
                .push(std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?);
        }
        if self.plain_http {
            settings.plain_http.push(host.clone());
        }
        if self.tls {
            settings.tls.push(host);
        }
        if cache_dir.is_some() {
            settings.cache_dir = cache_dir;
        }
        Ok(Registry::new(settings)?)
    }
}

/// Parse an `oci://` reference argument.
pub fn parse_reference(text: &str) -> anyhow::Result<ModuleRef> {
    Ok(text.parse::<ModuleRef>()?)
}
