//! Who may do what: bearer tokens, roles, and one pure decision per request.
//!
//! A token reads `ceccm_<id>_<secret>`. The server keeps, per id, a `Token` object with the user,
//! the role, the expiry and the sha256 of the secret, never the secret itself: it is shown once,
//! when the token is made. On first start the server makes an administrator token and writes it
//! to `DATA_DIR/admin.token` (mode 0600), as k3s writes its admin kubeconfig.
//!
//! [`authorize`] decides from the principal's role and the action alone (no store, no I/O); the
//! handlers gather the action, ask, and answer 403 with the error JSON when refused.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};
use crate::resources::Kind;

/// What a token's holder may do. Ordered: each human role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything except tokens.
    Viewer,
    /// Also creates, changes and deletes Applications and Datasets, cancels and retries.
    User,
    /// Also manages Regions.
    Operator,
    /// Everything: tokens, status, host commands.
    Admin,
    /// A worker of a region: leases tasks, reports on them, moves their data. Nothing else.
    Worker,
    /// An edge agent, bound to one region (its token names it): what a worker may, for that
    /// region only, and the region's heartbeat.
    Agent,
    /// The join token (`DATA_DIR/join.token`): exchanges itself for an agent's token.
    Join,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Viewer,
        Role::User,
        Role::Operator,
        Role::Admin,
        Role::Worker,
        Role::Agent,
        Role::Join,
    ];

    /// The roles an administrator gives with `ceccmctl create token` (agents get theirs by
    /// joining; the join token is the server's).
    pub const GRANTABLE: [Role; 5] = [
        Role::Viewer,
        Role::User,
        Role::Operator,
        Role::Admin,
        Role::Worker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::User => "user",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Worker => "worker",
            Role::Agent => "agent",
            Role::Join => "join",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
    /// The one region an agent acts for; `None`: not bound to a region.
    pub region: Option<String>,
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Get, list or watch objects of a kind, read their content, results, logs or artifacts.
    Read(Kind),
    /// Create, change or delete objects of a kind (and a Dataset's content, an Application's
    /// cancel and retry).
    Write(Kind),
    /// Write an object's status (the controllers' and agents' subresource).
    WriteStatus(Kind),
    /// Submit an Application that runs host commands (`app: container` without an image).
    RunHostCommands,
    /// Lease tasks, heartbeat, complete or fail them, upload their artifacts.
    RunTasks,
    /// Make, list and revoke tokens; read the audit log.
    ManageTokens,
    /// Read the server's metrics and the predictor's state.
    ReadMetrics,
    /// Exchange the join token for an agent's token, registering its region.
    JoinRegion,
    /// Report a region's agent heartbeat (capacity, workers, energy).
    ReportRegion,
}

/// Whether `role` may do `action`.
pub fn authorize(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Admin => true,
        Role::Worker => matches!(action, Read(_) | RunTasks),
        Role::Agent => matches!(action, Read(_) | RunTasks | ReportRegion),
        Role::Join => matches!(action, JoinRegion),
        Role::Viewer => matches!(action, Read(_) | ReadMetrics),
        Role::User => match action {
            Read(_) | ReadMetrics => true,
            Write(kind) => matches!(kind, Kind::Application | Kind::Dataset),
            _ => false,
        },
        Role::Operator => match action {
            Read(_) | ReadMetrics => true,
            Write(kind) => matches!(kind, Kind::Application | Kind::Dataset | Kind::Region),
            _ => false,
        },
    }
}

impl Principal {
    /// `Ok` when allowed, else the 403 the API answers.
    pub fn may(&self, action: Action) -> Result<(), ApiError> {
        if authorize(self.role, action) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "user {:?} (role {}) may not {}",
                self.user,
                self.role.as_str(),
                describe(action)
            ),
        ))
    }

    /// `Ok` when the caller may act for `region`: an agent only for its own (Kubernetes'
    /// NodeRestriction), everyone else for any.
    pub fn acts_for(&self, region: &str) -> Result<(), ApiError> {
        match &self.region {
            Some(own) if own != region => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "user {:?} is the agent of region {own:?} and may not act for region {region:?}",
                    self.user
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn describe(action: Action) -> String {
    match action {
        Action::Read(kind) => format!("read {}", kind.plural()),
        Action::Write(kind) => format!("create, change or delete {}", kind.plural()),
        Action::WriteStatus(kind) => format!("write the status of {}", kind.plural()),
        Action::RunHostCommands => {
            "run host commands (`app: container` tasks; administrators only)".into()
        }
        Action::RunTasks => "lease or report tasks (workers only)".into(),
        Action::ManageTokens => "manage tokens (administrators only)".into(),
        Action::ReadMetrics => "read metrics".into(),
        Action::JoinRegion => "join a region as its agent (the join token only)".into(),
        Action::ReportRegion => {
            "report a region's heartbeat or send its datasets (its agent only)".into()
        }
    }
}

/// Whether `who` sees `object` (of `kind`) at all. Users see only what they own: their
/// Applications and Datasets, the Tasks of their Applications, and the Events about any of
/// these (the server stamps `metadata.owner` on each from the object it follows). To them
/// another user's answers 404, so names do not leak. Events about Regions (which every role
/// reads) are everyone's. Everyone else sees everything their role reads.
pub fn sees(who: &Principal, kind: Kind, object: &serde_json::Value) -> bool {
    who.role != Role::User
        || !owned(kind, object)
        || object["metadata"]["owner"] == who.user.as_str()
}

/// [`sees`] for an object of a kind other than Event, from its `metadata.owner` alone (what the
/// store's mirror indexes).
pub fn sees_owned_by(who: &Principal, kind: Kind, owner: Option<&str>) -> bool {
    debug_assert!(
        kind != Kind::Event,
        "events are owned by what they are about"
    );
    who.role != Role::User
        || !owned(kind, &serde_json::Value::Null)
        || owner == Some(who.user.as_str())
}

/// Whether `object` (of `kind`) belongs to a user: Applications, Datasets and Tasks always
/// (one without an owner is nobody's to see), Events when they are about one of those.
fn owned(kind: Kind, object: &serde_json::Value) -> bool {
    match kind {
        Kind::Application | Kind::Dataset | Kind::Task => true,
        Kind::Event => matches!(
            object["involvedObject"]["kind"].as_str(),
            Some("Application" | "Dataset" | "Task") | None
        ),
        Kind::Region | Kind::Token => false,
    }
}

/// The caller an OIDC ID token names, with the highest role its groups map to; none: a 403
/// (authenticated, but bound to no role, as a Kubernetes user without bindings).
pub fn oidc_principal(
    identity: crate::oidc::OidcIdentity,
    roles: &[(String, Role)],
) -> Result<Principal, ApiError> {
    match crate::oidc::role_of(&identity.groups, roles) {
        Some(role) => Ok(Principal {
            user: identity.user,
            role,
            region: None,
        }),
        None => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "user {:?} is authenticated, but none of their groups {:?} maps to a role \
                 (ceccm server --oidc-role GROUP=ROLE)",
                identity.user, identity.groups
            ),
        )
        .with_details(serde_json::json!({"user": identity.user, "groups": identity.groups}))),
    }
}

/// The caller a verified client certificate names, as Kubernetes' x509 client-certificate
/// authentication: the CN is the user (a DNS label, as token users' names are), each O a
/// group; the groups that are human roles (`viewer`, `user`, `operator`, `admin`) give the
/// highest of them. No CN is a 401; no role among the O values a 403.
pub fn certificate_principal(
    subject: &crate::tls::CertificateSubject,
) -> Result<Principal, ApiError> {
    let Some(user) = subject
        .common_name
        .as_deref()
        .filter(|cn| crate::resources::validate_name(cn).is_ok())
    else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "the client certificate's subject CN {:?} is not a user name (a DNS label)",
                subject.common_name
            ),
        ));
    };
    let role = subject
        .organizations
        .iter()
        .filter_map(|o| Role::parse(o))
        .filter(|r| matches!(r, Role::Viewer | Role::User | Role::Operator | Role::Admin))
        .max();
    match role {
        Some(role) => Ok(Principal {
            user: user.to_string(),
            role,
            region: None,
        }),
        None => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "user {user:?} (client certificate) has no role: its subject's O values {:?} \
                 name none of viewer, user, operator, admin",
                subject.organizations
            ),
        )),
    }
}

/// A token as presented: `ceccm_<id>_<secret>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedToken<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

impl<'a> PresentedToken<'a> {
    pub fn parse(token: &'a str) -> Option<Self> {
        let rest = token.strip_prefix("ceccm_")?;
        let (id, secret) = rest.split_once('_')?;
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex(id, ID_HEX) && hex(secret, SECRET_HEX)).then_some(PresentedToken { id, secret })
    }
}

const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A new token: its id and the whole string (shown once).
pub fn new_token() -> (String, String) {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..ID_HEX];
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    (id.to_string(), format!("ceccm_{id}_{secret}"))
}

/// What is stored of a secret.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equality that takes the same time wherever the inputs differ.
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The spec of a stored `Token` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSpec {
    pub user: String,
    pub role: Role,
    /// RFC 3339; none: never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub secret_sha256: String,
    /// The region an agent's token acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Why a presented token does not authenticate (all answer 401; the reason goes to the log,
/// never the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Missing,
    Malformed,
    Unknown,
    Expired,
}

/// Decides whether `spec` (the stored record of `presented`'s id, if any) authenticates it
/// at `now_millis` (Unix time). An expiry that does not parse counts as expired.
pub fn check_token(
    presented: &PresentedToken<'_>,
    spec: Option<&TokenSpec>,
    now_millis: i64,
) -> Result<Principal, Rejected> {
    let Some(spec) = spec else {
        return Err(Rejected::Unknown);
    };
    if !same_hash(&secret_hash(presented.secret), &spec.secret_sha256) {
        return Err(Rejected::Unknown);
    }
    if spec
        .expires_at
        .as_deref()
        .is_some_and(|at| crate::time::parse_millis(at).is_none_or(|at| at <= now_millis))
    {
        return Err(Rejected::Expired);
    }
    Ok(Principal {
        user: spec.user.clone(),
        role: spec.role,
        region: spec.region.clone(),
    })
}

/// The 401 the API answers.
pub fn unauthenticated(why: Rejected) -> ApiError {
    let message = match why {
        Rejected::Missing => {
            "authentication required: send `Authorization: Bearer TOKEN` (ceccmctl: --token, \
             $CECCM_TOKEN or the context's token; the administrator's is in DATA_DIR/admin.token)"
        }
        Rejected::Malformed => "the bearer token is not a ceccm token (ceccm_<id>_<secret>)",
        Rejected::Unknown => "the bearer token is not valid (unknown or revoked)",
        Rejected::Expired => "the bearer token has expired",
    };
    ApiError::new(ErrorCode::Unauthorized, message)
}

/// The administrator token file's name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The join token file's name in the data directory (agents present it to join, as k3s agents
/// present the server's node-token).
pub const JOIN_TOKEN_FILE: &str = "join.token";

/// Reads the administrator token of a data directory.
pub fn read_admin_token(data_dir: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE))?
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_table_says() {
        use Action::*;
        let kinds = [
            Kind::Region,
            Kind::Application,
            Kind::Dataset,
            Kind::Task,
            Kind::Event,
        ];
        for kind in kinds {
            for role in Role::ALL {
                assert_eq!(
                    authorize(role, Read(kind)),
                    role != Role::Join,
                    "{role:?} reads {kind:?}"
                );
            }
            let writers: Vec<Role> = Role::ALL
                .into_iter()
                .filter(|r| authorize(*r, Write(kind)))
                .collect();
            let expected = match kind {
                Kind::Application | Kind::Dataset => vec![Role::User, Role::Operator, Role::Admin],
                Kind::Region => vec![Role::Operator, Role::Admin],
                _ => vec![Role::Admin],
            };
            assert_eq!(writers, expected, "writers of {kind:?}");
            for role in [
                Role::Viewer,
                Role::User,
                Role::Operator,
                Role::Worker,
                Role::Agent,
                Role::Join,
            ] {
                assert!(
                    !authorize(role, WriteStatus(kind)),
                    "{role:?} writes status"
                );
            }
        }
        for role in [Role::Viewer, Role::User, Role::Operator, Role::Worker] {
            assert!(!authorize(role, ManageTokens));
            assert!(!authorize(role, RunHostCommands));
        }
        for role in [Role::Viewer, Role::User, Role::Operator] {
            assert!(
                !authorize(role, RunTasks),
                "{role:?} may not act as a worker"
            );
        }
        assert!(authorize(Role::Worker, RunTasks));
        assert!(!authorize(Role::Worker, ReadMetrics));
        // Only agents report a region's heartbeat, only the join token (and admins) join.
        let reporters: Vec<Role> = Role::ALL
            .into_iter()
            .filter(|r| authorize(*r, ReportRegion))
            .collect();
        assert_eq!(reporters, [Role::Admin, Role::Agent]);
        let joiners: Vec<Role> = Role::ALL
            .into_iter()
            .filter(|r| authorize(*r, JoinRegion))
            .collect();
        assert_eq!(joiners, [Role::Admin, Role::Join]);
        assert!(authorize(Role::Agent, RunTasks));
        for action in [ManageTokens, RunHostCommands, RunTasks, ReadMetrics] {
            assert!(!authorize(Role::Join, action), "join may not {action:?}");
        }
    }

    #[test]
    fn users_see_tasks_and_events_of_what_they_own_only() {
        let who = |role| Principal {
            user: "ana".into(),
            role,
            region: None,
        };
        let owned_by = |owner: Option<&str>, involved: Option<&str>| {
            let mut object = serde_json::json!({"metadata": {"name": "x"}});
            if let Some(owner) = owner {
                object["metadata"]["owner"] = owner.into();
            }
            if let Some(kind) = involved {
                object["involvedObject"] = serde_json::json!({"kind": kind, "name": "x"});
            }
            object
        };
        let ana = who(Role::User);
        for kind in [Kind::Application, Kind::Dataset, Kind::Task] {
            assert!(sees(&ana, kind, &owned_by(Some("ana"), None)), "{kind:?}");
            assert!(!sees(&ana, kind, &owned_by(Some("bo"), None)), "{kind:?}");
            assert!(!sees(&ana, kind, &owned_by(None, None)), "{kind:?} unowned");
        }
        for involved in ["Application", "Dataset", "Task"] {
            let mine = owned_by(Some("ana"), Some(involved));
            assert!(sees(&ana, Kind::Event, &mine), "{involved}");
            let theirs = owned_by(Some("bo"), Some(involved));
            assert!(!sees(&ana, Kind::Event, &theirs), "{involved}");
            assert!(!sees(&ana, Kind::Event, &owned_by(None, Some(involved))));
        }
        // Events about regions are everyone's; one about nothing is nobody's.
        assert!(sees(&ana, Kind::Event, &owned_by(None, Some("Region"))));
        assert!(!sees(&ana, Kind::Event, &owned_by(None, None)));
        assert!(sees(&ana, Kind::Region, &owned_by(None, None)));
        // Every other role sees everything it reads.
        for role in [
            Role::Viewer,
            Role::Operator,
            Role::Admin,
            Role::Worker,
            Role::Agent,
        ] {
            for kind in Kind::ALL {
                assert!(sees(&who(role), kind, &owned_by(Some("bo"), Some("Task"))));
            }
        }
    }

    #[test]
    fn client_certificates_name_the_user_and_their_highest_role() {
        let subject = |cn: Option<&str>, o: &[&str]| crate::tls::CertificateSubject {
            common_name: cn.map(str::to_string),
            organizations: o.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            certificate_principal(&subject(Some("ana"), &["astro", "viewer", "user"])).ok(),
            Some(Principal {
                user: "ana".into(),
                role: Role::User,
                region: None,
            })
        );
        let code = |s| certificate_principal(&s).map_err(|e| e.code);
        assert_eq!(
            code(subject(Some("ana"), &["astro"])),
            Err(ErrorCode::Forbidden)
        );
        // Workers, agents and the join token are never a certificate's role.
        for o in ["worker", "agent", "join"] {
            assert_eq!(code(subject(Some("ana"), &[o])), Err(ErrorCode::Forbidden));
        }
        for cn in [None, Some(""), Some("Ana"), Some("oidc:ana"), Some("a.b")] {
            assert_eq!(
                code(subject(cn, &["admin"])),
                Err(ErrorCode::Unauthorized),
                "{cn:?}"
            );
        }
    }

    #[test]
    fn tokens_authenticate_only_with_their_secret_and_before_they_expire() {
        let (id, token) = new_token();
        let presented = PresentedToken::parse(&token).unwrap();
        assert_eq!(presented.id, id);
        let spec = TokenSpec {
            user: "ana".into(),
            role: Role::User,
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            secret_sha256: secret_hash(presented.secret),
            region: None,
        };
        let now = crate::time::parse_millis("2029-12-31T23:59:59Z").unwrap();
        assert_eq!(
            check_token(&presented, Some(&spec), now),
            Ok(Principal {
                user: "ana".into(),
                role: Role::User,
                region: None,
            })
        );
        assert_eq!(
            check_token(
                &presented,
                Some(&spec),
                crate::time::parse_millis("2030-01-01T00:00:01Z").unwrap()
            ),
            Err(Rejected::Expired)
        );
        assert_eq!(check_token(&presented, None, now), Err(Rejected::Unknown));
        let (_, other) = new_token();
        let forged = PresentedToken {
            id: presented.id,
            secret: PresentedToken::parse(&other).unwrap().secret,
        };
        assert_eq!(
            check_token(&forged, Some(&spec), now),
            Err(Rejected::Unknown)
        );
        for bad in [
            "",
            "Bearer x",
            "ceccm_zz_yy",
            &token[..token.len() - 1],
            &format!("{token}0"),
        ] {
            assert_eq!(PresentedToken::parse(bad), None, "{bad:?}");
        }
    }
}
