//! ceccmctl: the kubectl-style command-line client of ceccm.

mod apply;
mod client;
mod commands;
mod config;
mod describe;
mod error;
mod kinds;
mod manifest;
mod output;
mod regions;
mod results;
mod table;
mod time;
mod tokens;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::error::Result;

const EXIT_STATUS: &str = "\
Exit status:
  0  success
  1  the request failed: the server answered an error (its message is printed on stderr),
     the server could not be reached, or a local file could not be written
  2  usage error: bad arguments, unknown kind, unreadable or invalid manifest; nothing was sent

Server: --server URL, else $CECCM_SERVER, else the current context of the config file
($CECCM_CONFIG, else $XDG_CONFIG_HOME/ceccm/config.yaml, else ~/.config/ceccm/config.yaml),
else http://127.0.0.1:8080. Token: --token, else $CECCM_TOKEN, else the context's. CA of an
https server: --ca-file, else $CECCM_CA_FILE, else the context's certificateAuthority.";

#[derive(Parser, Debug)]
#[command(
    name = "ceccmctl",
    version,
    about = "Control ceccm, the control plane of the cloud-edge continuum for astronomy",
    after_help = EXIT_STATUS,
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
struct GlobalArgs {
    /// Server URL; overrides $CECCM_SERVER and the context's
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Bearer token; overrides $CECCM_TOKEN and the context's
    #[arg(long, global = true)]
    token: Option<String>,
    /// Context of the config file to use instead of the current one
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// PEM file of a certificate authority to trust for https servers; overrides
    /// $CECCM_CA_FILE and the context's
    #[arg(long, global = true, value_name = "FILE", visible_alias = "ca-file")]
    certificate_authority: Option<PathBuf>,
    /// Do not verify the server's certificate (insecure: for tests only)
    #[arg(
        long,
        global = true,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    insecure_skip_tls_verify: Option<bool>,
    /// PEM file of a client certificate to present to a server that takes them (its CN is
    /// the user, its O the role); overrides $CECCM_CLIENT_CERTIFICATE
    #[arg(long, global = true, value_name = "FILE", requires = "client_key")]
    client_certificate: Option<PathBuf>,
    /// PEM file of --client-certificate's private key; overrides $CECCM_CLIENT_KEY
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        requires = "client_certificate"
    )]
    client_key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CreateCommand {
    /// A token for user NAME, printed once on stdout; delete it with `delete token ID`
    Token {
        /// The user the token acts for
        name: String,
        /// viewer (reads), user (own applications and datasets), operator (also regions),
        /// admin (everything), worker (a region's workers)
        #[arg(long, value_parser = ["viewer", "user", "operator", "admin", "worker"])]
        role: String,
        /// Lifetime, e.g. 90m, 24h; default: never expires
        #[arg(long, value_parser = commands::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create or update objects from manifests (server-side apply)
    #[command(after_long_help = apply::HELP)]
    Apply(ApplyArgs),
    /// Create a bearer token for a user (administrators only)
    #[command(subcommand)]
    Create(CreateCommand),
    /// List objects of a kind, or show some by name
    Get(GetArgs),
    /// Show an object in detail: spec, status, conditions and recent events
    Describe {
        /// Kind (region, application, dataset, task; singular, plural or short) or KIND/NAME
        kind: String,
        /// Name(s); all objects of the kind when none
        names: Vec<String>,
    },
    /// Delete objects by kind and name or from manifests; waits for finalizers by default
    Delete(DeleteArgs),
    /// Print the worker output of an application's tasks
    Logs {
        /// application/NAME (or just NAME)
        target: String,
        /// Only this task (its name, e.g. m51-00003, or its index, e.g. 3)
        #[arg(long, value_name = "ID")]
        task: Option<String>,
        /// Keep following the output until the application finishes or Ctrl-C
        #[arg(short, long)]
        follow: bool,
    },
    /// Show load, power and energy per region (or per application), or the placement
    /// predictor's state and error
    Top {
        /// regions (rg), applications (apps) or predictor
        kind: String,
    },
    /// Upload a file as the content of a dataset, with a progress bar
    Upload {
        /// Kind: dataset
        kind: String,
        /// Dataset name (created when it does not exist)
        name: String,
        /// File to upload
        file: PathBuf,
    },
    /// Download an application's results or a dataset's content, with a progress bar
    Download {
        /// application/NAME or dataset/NAME
        target: String,
        /// Directory to write into (default: ./NAME)
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// List the result files of an application: name, size and sha256
    Results {
        /// application/NAME, application NAME (any alias of the kind) or NAME
        #[arg(required = true, num_args = 1..=2, value_name = "TARGET")]
        target: Vec<String>,
        /// Output format (json and yaml print the results index as the server serves it,
        /// name one file name per line)
        #[arg(short, long, value_enum, default_value_t = output::Format::Table)]
        output: output::Format,
    },
    /// Cancel applications: their workers stop, finished chunks are kept, phase Cancelled
    Cancel {
        /// application/NAME..., application NAME... or NAME
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Run failed or cancelled applications again: their dead-lettered tasks are queued again
    /// with fresh attempts
    Retry {
        /// application/NAME..., application NAME... or NAME
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Stop placing work on regions (spec.unschedulable); what is there stays
    Cordon {
        /// region/NAME..., or region NAME...
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Place work on cordoned regions again
    Uncordon {
        /// region/NAME..., or region NAME...
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Cordon regions, move their queued work elsewhere and wait for their running work
    Drain {
        /// region/NAME..., or region NAME...
        #[arg(required = true, value_name = "TARGET")]
        targets: Vec<String>,
        /// Give up waiting for running work after this long (e.g. 90s, 5m)
        #[arg(long, default_value = "5m", value_parser = commands::parse_duration)]
        timeout: std::time::Duration,
    },
    /// View and edit contexts (server URL, token, TLS CA) in the config file
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
struct ApplyArgs {
    /// Manifest file, directory of manifests, or - for stdin (repeatable)
    #[arg(short, long = "filename", required = true, value_name = "FILE|DIR|-")]
    files: Vec<String>,
    /// `server`: validate every object on the server and store nothing
    #[arg(long, value_enum, default_value_t = DryRun::None, value_name = "MODE")]
    dry_run: DryRun,
    /// Apply each valid document even when others are invalid
    #[arg(long)]
    continue_on_error: bool,
}

#[derive(Args, Debug)]
struct GetArgs {
    /// Kind (singular, plural or short: rg, app, ds, ...) or KIND/NAME
    kind: String,
    /// Name(s); all objects of the kind when none
    names: Vec<String>,
    /// Label selector (k=v, k!=v, k in (a,b), k notin (a,b), k, !k)
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// Field selector (events: involvedObject.kind=K,involvedObject.name=N)
    #[arg(long, value_name = "SELECTOR")]
    field_selector: Option<String>,
    /// Output format
    #[arg(short, long, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
    /// After listing, follow changes until interrupted
    #[arg(short, long)]
    watch: bool,
}

#[derive(Args, Debug)]
struct DeleteArgs {
    /// Kind or KIND/NAME (not with -f)
    kind: Option<String>,
    /// Name(s)
    names: Vec<String>,
    /// Delete the objects named in these manifests
    #[arg(
        short,
        long = "filename",
        value_name = "FILE|DIR|-",
        conflicts_with = "kind"
    )]
    files: Vec<String>,
    /// Wait until finalizers have run and the object is gone
    #[arg(long, action = ArgAction::Set, default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    wait: bool,
    /// Give up waiting after this long (e.g. 30s, 5m, 1h)
    #[arg(long, default_value = "5m", value_parser = commands::parse_duration)]
    timeout: std::time::Duration,
    /// Treat objects that do not exist as deleted
    #[arg(long)]
    ignore_not_found: bool,
    /// `server`: ask the server whether it would delete, without deleting
    #[arg(long, value_enum, default_value_t = DryRun::None, value_name = "MODE")]
    dry_run: DryRun,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum DryRun {
    None,
    Server,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the config file (tokens hidden unless --raw)
    View {
        #[arg(long)]
        raw: bool,
    },
    /// Create or update a context from --server, --token and --certificate-authority
    SetContext {
        name: String,
        /// Also make it the current context
        #[arg(long)]
        current: bool,
    },
    /// Make a context the current one
    UseContext { name: String },
    /// Print the current context's name
    CurrentContext,
    /// List the contexts
    GetContexts,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", output::error_line(&e));
            e.exit_code()
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let target = || -> Result<client::Client> {
        let path = config::path()?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let overrides = config::Overrides {
            server: cli.global.server.clone().or_else(|| env("CECCM_SERVER")),
            token: cli.global.token.clone().or_else(|| env("CECCM_TOKEN")),
            context: cli.global.context.clone(),
            certificate_authority: cli
                .global
                .certificate_authority
                .clone()
                .or_else(|| env("CECCM_CA_FILE").map(PathBuf::from)),
            insecure_skip_tls_verify: cli.global.insecure_skip_tls_verify,
            client_certificate: cli
                .global
                .client_certificate
                .clone()
                .or_else(|| env("CECCM_CLIENT_CERTIFICATE").map(PathBuf::from)),
            client_key: cli
                .global
                .client_key
                .clone()
                .or_else(|| env("CECCM_CLIENT_KEY").map(PathBuf::from)),
        };
        client::Client::new(&config::load(&path)?.resolve(&overrides)?)
    };
    match cli.command {
        Command::Apply(args) => {
            let options = apply::Options {
                files: args.files,
                dry_run: args.dry_run == DryRun::Server,
                continue_on_error: args.continue_on_error,
            };
            apply::run(&target()?, &options).await
        }
        Command::Get(args) if tokens::is_tokens(&args.kind) => tokens::list(&target()?).await,
        Command::Get(args) if tokens::is_audit(&args.kind) => tokens::audit(&target()?).await,
        Command::Get(args) => {
            let options = commands::GetOptions {
                kind: args.kind,
                names: args.names,
                selector: args.selector,
                field_selector: args.field_selector,
                format: args.output,
                watch: args.watch,
            };
            commands::get(&target()?, &options).await
        }
        Command::Describe { kind, names } => describe::run(&target()?, &kind, &names).await,
        Command::Create(CreateCommand::Token { name, role, ttl }) => {
            tokens::create(&target()?, &name, &role, ttl).await
        }
        Command::Delete(args) if args.kind.as_deref().is_some_and(tokens::is_tokens) => {
            tokens::delete(&target()?, &args.names).await
        }
        Command::Delete(args) => {
            let options = commands::DeleteOptions {
                kind: args.kind,
                names: args.names,
                files: args.files,
                wait: args.wait,
                timeout: args.timeout,
                ignore_not_found: args.ignore_not_found,
                dry_run: args.dry_run == DryRun::Server,
            };
            commands::delete(&target()?, &options).await
        }
        Command::Logs {
            target: object,
            task,
            follow,
        } => commands::logs(&target()?, &object, task.as_deref(), follow).await,
        Command::Top { kind } => commands::top(&target()?, &kind).await,
        Command::Upload { kind, name, file } => {
            transfer::upload(&target()?, &kind, &name, &file).await
        }
        Command::Download { target: object, to } => {
            transfer::download(&target()?, &object, to.as_deref()).await
        }
        Command::Results {
            target: words,
            output,
        } => results::run(&target()?, &words, output).await,
        Command::Cancel { targets } => {
            commands::act(&target()?, commands::AppAction::Cancel, &targets).await
        }
        Command::Retry { targets } => {
            commands::act(&target()?, commands::AppAction::Retry, &targets).await
        }
        Command::Cordon { targets } => regions::cordon(&target()?, &targets, true).await,
        Command::Uncordon { targets } => regions::cordon(&target()?, &targets, false).await,
        Command::Drain { targets, timeout } => regions::drain(&target()?, &targets, timeout).await,
        Command::Config(command) => config_command(command, cli.global),
        Command::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ceccmctl", &mut out);
            output::print_bytes(&out)
        }
    }
}

fn config_command(command: ConfigCommand, global: GlobalArgs) -> Result<()> {
    let path = config::path()?;
    let mut config = config::load(&path)?;
    match command {
        ConfigCommand::View { raw } => {
            let shown = if raw { config } else { config.redacted() };
            output::print(&output::to_yaml(&shown)?)
        }
        ConfigCommand::SetContext { name, current } => {
            let existed = config.context(&name).is_some();
            let client = config::client_pair(
                global.client_certificate.as_ref(),
                global.client_key.as_ref(),
            )?;
            config.set_context(
                &name,
                global.server,
                global.token,
                global.certificate_authority,
                global.insecure_skip_tls_verify,
            )?;
            if let Some((cert, key)) = client {
                config.set_client_certificate(&name, cert, key)?;
            }
            if current {
                config.use_context(&name)?;
            }
            config::save(&path, &config)?;
            let verb = if existed { "modified" } else { "created" };
            output::print(&format!("Context \"{name}\" {verb}.\n"))
        }
        ConfigCommand::UseContext { name } => {
            config.use_context(&name)?;
            config::save(&path, &config)?;
            output::print(&format!("Switched to context \"{name}\".\n"))
        }
        ConfigCommand::CurrentContext => match &config.current_context {
            Some(name) => output::print(&format!("{name}\n")),
            None => Err(error::usage!("current-context is not set")),
        },
        ConfigCommand::GetContexts => {
            let mut rows = vec![vec!["CURRENT".into(), "NAME".into(), "SERVER".into()]];
            for context in &config.contexts {
                let current = config.current_context.as_deref() == Some(context.name.as_str());
                rows.push(vec![
                    if current { "*" } else { "" }.into(),
                    context.name.clone(),
                    context.server.clone(),
                ]);
            }
            output::print(&table::render(&rows))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wait_takes_an_optional_boolean() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Delete(d) => d.wait,
            other => panic!("{other:?}"),
        };
        assert!(parse(&["ceccmctl", "delete", "app", "x"]));
        assert!(parse(&["ceccmctl", "delete", "app", "x", "--wait"]));
        assert!(!parse(&["ceccmctl", "delete", "app", "x", "--wait=false"]));
    }

    #[test]
    fn results_cancel_and_retry_take_their_targets() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap().command;
        match parse(&["ceccmctl", "results", "application", "m51", "-o", "json"]) {
            Command::Results { target, output } => {
                assert_eq!(target, ["application", "m51"]);
                assert_eq!(output, output::Format::Json);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["ceccmctl", "cancel", "app/a", "app/b"]) {
            Command::Cancel { targets } => assert_eq!(targets, ["app/a", "app/b"]),
            other => panic!("{other:?}"),
        }
        match parse(&["ceccmctl", "retry", "m51"]) {
            Command::Retry { targets } => assert_eq!(targets, ["m51"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn usage_errors_exit_with_2() {
        for args in [
            &["ceccmctl", "get"][..],
            &["ceccmctl", "apply"],
            &["ceccmctl", "get", "rg", "-o", "xml"],
            &["ceccmctl", "frobnicate"],
            &["ceccmctl", "delete", "app", "-f", "x.yaml"],
            &["ceccmctl", "results"],
            &["ceccmctl", "results", "app", "a", "b"],
            &["ceccmctl", "results", "app/a", "-o", "xml"],
            &["ceccmctl", "cancel"],
            &["ceccmctl", "retry"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
