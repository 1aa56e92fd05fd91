//! `weftctl`: parses flags, runs one command, prints its table or JSON and maps the outcome to
//! an exit status. The work lives in the library (`src/lib.rs`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use weftctl::admin::{AdminClient, AdminError};
use weftctl::docs::{Clients, Endpoints, ProxyConfig};
use weftctl::render::{self, ConfigFilter};
use weftctl::validate;

// Exit statuses: 0 done; 1 (below); 2 bad usage (clap's); 3 (below).

/// The answer is "no": files are invalid, or the node or service asked for does not exist.
const EXIT_NO: u8 = 1;
/// No answer: the control plane could not be reached or answered something unexpected.
const EXIT_NO_ANSWER: u8 = 3;

/// Inspect a Weft control plane through its admin port, and validate registry files and CRD
/// YAML offline.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version, propagate_version = true)]
struct Cli {
    /// Base URL of the control plane's admin port (`--admin-listen`).
    #[arg(
        long,
        env = "WEFT_ADMIN",
        default_value = "http://127.0.0.1:19000",
        global = true
    )]
    admin: String,
    /// Output format: aligned tables for people, or JSON for scripts (the server's document
    /// as served; for `validate` a machine-readable report).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// How long to wait for the admin port to answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdsType {
    Cds,
    Eds,
    Lds,
    Rds,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every connected xDS stream and, per type, whether it holds the current config
    /// (SYNCED), is behind (STALE) or rejects it (NACKED); then every rejected resource.
    Status,
    /// What one proxy was sent: per stream, per type, per resource.
    Config {
        /// The proxy's node id.
        node: String,
        /// Only these types (repeatable or comma-separated).
        #[arg(short = 't', long = "type", value_enum, value_delimiter = ',')]
        types: Vec<XdsType>,
        /// Only these resources, and print each one's current content as the control plane
        /// has it (repeatable or comma-separated).
        #[arg(long = "name", value_delimiter = ',')]
        names: Vec<String>,
    },
    /// A service's instances as the merged registry holds them; all services without one.
    Endpoints {
        /// The service's name.
        service: Option<String>,
    },
    /// Validate registry files and Weft CRD YAML offline, as the control plane would.
    Validate {
        /// Registry files (YAML or JSON) and Kubernetes YAML; registry files are checked
        /// together, as one `--registry-file` set.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Namespace of CRD documents that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<AdminError>() {
            // Its message already holds the root cause; reqwest's chain below it would only
            // repeat it three times.
            Some(admin) => {
                eprintln!("weftctl: {admin}");
                ExitCode::from(if admin.is_not_found() {
                    EXIT_NO
                } else {
                    EXIT_NO_ANSWER
                })
            }
            None => {
                eprintln!("weftctl: {e:#}");
                ExitCode::from(EXIT_NO_ANSWER)
            }
        },
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    if let Command::Validate { files, namespace } = &cli.command {
        // Offline: no runtime, no client, no --admin needed.
        let report = validate::validate_files(files, namespace);
        let text = match cli.output {
            Output::Table => validate::render(&report),
            Output::Json => json(&serde_json::to_value(&report)?)?,
        };
        print(&text)?;
        return Ok(if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_NO)
        });
    }
    let client = AdminClient::new(&cli.admin, cli.timeout)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let text = runtime.block_on(remote(cli, &client))?;
    print(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// The commands that read the admin port; the text to print.
async fn remote(cli: &Cli, client: &AdminClient) -> anyhow::Result<String> {
    let table = cli.output == Output::Table;
    match &cli.command {
        Command::Status => {
            let doc = client.get("/debug/clients", &[]).await?;
            if !table {
                return json(&doc);
            }
            Ok(render::status(
                &decode::<Clients>(client, "/debug/clients", doc)?,
                now_ms(),
            ))
        }
        Command::Config { node, types, names } => {
            let path = "/debug/proxy_config";
            let doc = client.get(path, &[("node", node)]).await?;
            let filter = ConfigFilter {
                types: types
                    .iter()
                    .map(|t| format!("{t:?}").to_uppercase())
                    .collect(),
                names: names.iter().cloned().collect::<BTreeSet<_>>(),
            };
            if !table {
                return json(&filter.apply_json(doc));
            }
            Ok(render::proxy_config(
                &decode::<ProxyConfig>(client, path, doc)?,
                &filter,
                now_ms(),
            ))
        }
        Command::Endpoints { service } => {
            let path = "/debug/endpoints";
            let query: Vec<(&str, &str)> =
                service.iter().map(|s| ("service", s.as_str())).collect();
            let doc = client.get(path, &query).await?;
            if !table {
                return json(&doc);
            }
            let doc = decode::<Endpoints>(client, path, doc)?;
            match service {
                None => Ok(render::services(&doc)),
                Some(name) => match doc.services.iter().find(|s| &s.name == name) {
                    Some(s) => Ok(render::instances(s)),
                    // The server answers 404 for an unknown service; this is a server that
                    // ignored the filter.
                    None => Err(AdminError::NotFound {
                        url: client.url(path, &query).to_string(),
                        message: format!("the registry has no service `{name}`"),
                    }
                    .into()),
                },
            }
        }
        // Handled offline by `run`, before any client exists.
        Command::Validate { .. } => anyhow::bail!("validate does not use the admin port"),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    client: &AdminClient,
    path: &str,
    doc: serde_json::Value,
) -> Result<T, AdminError> {
    serde_json::from_value(doc).map_err(|source| AdminError::BadDocument {
        url: client.url(path, &[]).to_string(),
        source,
    })
}

fn json(doc: &serde_json::Value) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(doc)?;
    text.push('\n');
    Ok(text)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Prints `text`; a closed pipe (`weftctl status | head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}
