//! Who may set up a connection: signed setup links.
//!
//! A link is the connection page's URL with a `grant`: `v1.{expiry}.{HMAC}` over the connection
//! id, the origin and the expiry, signed with a key derived from `SECRET_KEY`. The page, the
//! form and the start of OAuth accept only a grant for their connection and origin that has not
//! expired, so only people the operator (the CLI's `setup-link`) or the host engine (the gRPC
//! `SetupLinksService.Create`) sent there can change a connection's credentials. With
//! `SETUP_ACCESS=loopback` the operator chooses instead to let any client on this machine in,
//! except a browser's request that another site's page sent to change a connection: any web
//! page open on this machine could otherwise set connections up (cross-site request forgery).

use std::net::SocketAddr;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::state::unix_now;
use crate::config::{Config, SetupAccess};
use crate::ids::ConnectionId;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Why a request may not set up a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// No grant, or one this service did not sign for this connection and origin.
    #[error(
        "this page needs a valid setup link: ask your operator or your workflow platform for a new one"
    )]
    Missing,
    /// A genuine grant that has expired.
    #[error(
        "this setup link has expired: ask your operator or your workflow platform for a new one"
    )]
    Expired,
    /// Let in only by `SETUP_ACCESS=loopback`, but sent by another site's page.
    #[error(
        "this request came from another site's page: open the connection page on this machine, or use a setup link"
    )]
    CrossSite,
}

/// A signed link and when it stops working. `Debug` hides the grant and the URL carrying it.
#[derive(Clone)]
pub struct Link {
    /// The `grant` parameter.
    pub grant: String,
    /// The whole URL of the connection page, when `WEBHOOK_ADDRESS` is set.
    pub url: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::secret::Raw;
        f.debug_struct("Link")
            .field("grant", &Raw("[redacted]"))
            .field("url", &Raw(crate::secret::presence(&self.url)))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Issues and checks setup links.
pub struct SetupLinks {
    key: [u8; 32],
    ttl: Duration,
    access: SetupAccess,
}

impl SetupLinks {
    /// Links signed with `key`, valid for `ttl`, under the `access` policy.
    pub fn new(key: [u8; 32], ttl: Duration, access: SetupAccess) -> Self {
        Self { key, ttl, access }
    }

    /// A link to the connection page of `cid` for `origin`.
    pub fn issue(&self, config: &Config, cid: &ConnectionId, origin: &str) -> Link {
        let expires_at = unix_now() + self.ttl.as_secs();
        let grant = format!("v1.{expires_at}.{}", self.mac(cid, origin, expires_at));
        let url = config.public_url(&format!(
            "{}?cid={cid}&origin={origin}&grant={grant}",
            crate::integration::CONNECTION_PATH
        ));
        Link {
            grant,
            url,
            expires_at,
        }
    }

    /// Whether a request from `peer` with `grant` may set up `cid` for `origin`;
    /// `from_other_site` is whether a browser says another site's page sent it.
    pub fn check(
        &self,
        cid: &ConnectionId,
        origin: &str,
        grant: Option<&str>,
        peer: Option<SocketAddr>,
        from_other_site: bool,
    ) -> Result<(), LinkError> {
        // `to_canonical`: on a dual-stack listener a local IPv4 client is `::ffff:127.0.0.1`.
        let local = self.access == SetupAccess::Loopback
            && peer.is_some_and(|p| p.ip().to_canonical().is_loopback());
        if local && !from_other_site {
            return Ok(());
        }
        match self.check_grant(cid, origin, grant) {
            Err(_) if local => Err(LinkError::CrossSite),
            result => result,
        }
    }

    /// How long `grant`, a valid grant for `cid` and `origin`, has left; `None` for any other.
    pub fn time_left(&self, cid: &ConnectionId, origin: &str, grant: &str) -> Option<Duration> {
        self.check_grant(cid, origin, Some(grant)).ok()?;
        let expires_at: u64 = grant.split('.').nth(1)?.parse().ok()?;
        Some(Duration::from_secs(expires_at.saturating_sub(unix_now())))
    }

    fn check_grant(
        &self,
        cid: &ConnectionId,
        origin: &str,
        grant: Option<&str>,
    ) -> Result<(), LinkError> {
        let grant = grant.filter(|g| g.len() <= 128).ok_or(LinkError::Missing)?;
        let mut parts = grant.split('.');
        let (Some("v1"), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(LinkError::Missing);
        };
        let expires_at: u64 = expires.parse().map_err(|_| LinkError::Missing)?;
        let mac = hex::decode(mac).map_err(|_| LinkError::Missing)?;
        self.hmac(cid, origin, expires_at)
            .verify_slice(&mac)
            .map_err(|_| LinkError::Missing)?;
        if expires_at < unix_now() {
            return Err(LinkError::Expired);
        }
        Ok(())
    }

    fn hmac(&self, cid: &ConnectionId, origin: &str, expires_at: u64) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(
            format!("zoom-integration setup link\0{cid}\0{origin}\0{expires_at}").as_bytes(),
        );
        mac
    }

    fn mac(&self, cid: &ConnectionId, origin: &str, expires_at: u64) -> String {
        hex::encode(self.hmac(cid, origin, expires_at).finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(ttl: u64, access: SetupAccess) -> SetupLinks {
        SetupLinks::new([3; 32], Duration::from_secs(ttl), access)
    }

    fn config() -> Config {
        Config::load([
            (
                "WEBHOOK_ADDRESS".to_string(),
                "zoom.example.com".to_string(),
            ),
            ("SECRET_KEY".to_string(), "k".repeat(32)),
        ])
        .unwrap()
    }

    #[test]
    fn a_links_debug_output_names_neither_its_grant_nor_its_url() {
        let link =
            links(600, SetupAccess::Signed).issue(&config(), &ConnectionId::generate(), "web");
        let printed = format!("{link:?}");
        assert!(link.url.is_some());
        assert!(!printed.contains(&link.grant), "{printed}");
        assert!(!printed.contains("zoom.example.com"), "{printed}");
    }

    #[test]
    fn a_link_opens_its_own_connection_and_origin_only() {
        let links = links(600, SetupAccess::Signed);
        let cid = ConnectionId::generate();
        let link = links.issue(&config(), &cid, "web");
        let url = link.url.unwrap();
        assert!(url.starts_with(&format!(
            "https://zoom.example.com/zoom/?cid={cid}&origin=web&grant=v1."
        )));
        assert_eq!(
            links.check(&cid, "web", Some(&link.grant), None, false),
            Ok(())
        );
        let other = ConnectionId::generate();
        assert_eq!(
            links.check(&other, "web", Some(&link.grant), None, false),
            Err(LinkError::Missing)
        );
        assert_eq!(
            links.check(&cid, "dash", Some(&link.grant), None, false),
            Err(LinkError::Missing)
        );
        assert_eq!(
            links.check(&cid, "web", None, None, false),
            Err(LinkError::Missing)
        );
        let later = link.grant.replacen(
            &link.expires_at.to_string(),
            &(link.expires_at + 9999).to_string(),
            1,
        );
        assert_eq!(
            links.check(&cid, "web", Some(&later), None, false),
            Err(LinkError::Missing)
        );
        let elsewhere = SetupLinks::new([4; 32], Duration::from_secs(600), SetupAccess::Signed);
        assert_eq!(
            elsewhere.check(&cid, "web", Some(&link.grant), None, false),
            Err(LinkError::Missing)
        );
    }

    #[test]
    fn an_old_link_has_expired() {
        let links = links(0, SetupAccess::Signed);
        let cid = ConnectionId::generate();
        let link = links.issue(&config(), &cid, "");
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            links.check(&cid, "", Some(&link.grant), None, false),
            Err(LinkError::Expired)
        );
    }

    #[test]
    fn loopback_mode_lets_in_this_machine_only() {
        let links = links(600, SetupAccess::Loopback);
        let cid = ConnectionId::generate();
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local6: SocketAddr = "[::1]:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "203.0.113.7:5000".parse().unwrap();
        let mapped_remote: SocketAddr = "[::ffff:203.0.113.7]:5000".parse().unwrap();
        assert_eq!(links.check(&cid, "web", None, Some(local), false), Ok(()));
        assert_eq!(links.check(&cid, "web", None, Some(local6), false), Ok(()));
        assert_eq!(links.check(&cid, "web", None, Some(mapped), false), Ok(()));
        assert_eq!(
            links.check(&cid, "web", None, Some(mapped_remote), false),
            Err(LinkError::Missing)
        );
        assert_eq!(
            links.check(&cid, "web", None, Some(remote), false),
            Err(LinkError::Missing)
        );
        // A signed link still works from anywhere.
        let link = links.issue(&config(), &cid, "web");
        assert_eq!(
            links.check(&cid, "web", Some(&link.grant), Some(remote), false),
            Ok(())
        );
        // Another site's page gets in only with a grant.
        assert_eq!(
            links.check(&cid, "web", None, Some(local), true),
            Err(LinkError::CrossSite)
        );
        assert_eq!(
            links.check(&cid, "web", Some(&link.grant), Some(local), true),
            Ok(())
        );
        let signed = SetupLinks::new([3; 32], Duration::from_secs(600), SetupAccess::Signed);
        assert_eq!(
            signed.check(&cid, "web", None, Some(local), false),
            Err(LinkError::Missing)
        );
    }
}
