//! `ceccmctl create token`, `get tokens` and `delete token`: bearer tokens for other users
//! (administrators only; the server answers 403 to anyone else).

use std::time::Duration;

use serde_json::{Value, json};

use crate::client::{Client, encode};
use crate::error::Result;

/// Whether a kind argument names tokens.
pub fn is_tokens(kind: &str) -> bool {
    matches!(kind, "token" | "tokens" | "tok")
}

/// Makes a token for `user` and prints it alone on stdout (it is shown only once), with what
/// it is on stderr.
pub async fn create(client: &Client, user: &str, role: &str, ttl: Option<Duration>) -> Result<()> {
    let mut request = json!({"user": user, "role": role});
    if let Some(ttl) = ttl {
        request["ttlSeconds"] = json!(ttl.as_secs().max(1));
    }
    let made = client.post_path("tokens", &request).await?;
    eprintln!(
        "token/{} created for user {user:?} (role {role}, {}); it is shown only once:",
        made["id"].as_str().unwrap_or("?"),
        made["expiresAt"]
            .as_str()
            .map_or_else(|| "never expires".to_string(), |at| format!("expires {at}"))
    );
    println!("{}", made["token"].as_str().unwrap_or_default());
    Ok(())
}

/// Lists tokens (never their secrets).
pub async fn list(client: &Client) -> Result<()> {
    let listed = client.get_path("tokens").await?;
    let items = listed["items"].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or("<never>").to_string();
    println!("{:<18} {:<20} {:<9} EXPIRES", "ID", "USER", "ROLE");
    for t in items {
        println!(
            "{:<18} {:<20} {:<9} {}",
            text(&t["id"]),
            text(&t["user"]),
            text(&t["role"]),
            text(&t["expiresAt"])
        );
    }
    Ok(())
}

/// Revokes tokens by id.
pub async fn delete(client: &Client, ids: &[String]) -> Result<()> {
    for id in ids {
        let revoked = client
            .delete_path(&format!("tokens/{}", encode(id)))
            .await?;
        println!(
            "token/{id} deleted (user {:?})",
            revoked["user"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
