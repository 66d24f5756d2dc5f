//! Where the shared services are: `DATABASE_URL` and `AMQP_URL`, or the local defaults.

use std::net::{SocketAddr, ToSocketAddrs};

/// The Postgres the tests use when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The broker the tests use when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The Postgres the tests create their databases in: `DATABASE_URL`, or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into())
}

/// The broker the tests use: `AMQP_URL`, or the local default.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into())
}

/// The broker's address, from [`amqp_url`].
pub fn broker_address() -> SocketAddr {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL");
    resolve(&uri.authority.host, uri.authority.port)
}

/// The address of the Postgres server of a `postgres://` URL (port 5432 when it names none).
pub fn database_address(database_url: &str) -> SocketAddr {
    let (_, host_port, _) = split_database_url(database_url);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let (host, port) = host_port.rsplit_once(':').expect("host:port");
    resolve(host, port.parse().expect("database port"))
}

/// The address of `host`, IPv4 first: the local services listen on 127.0.0.1, and `localhost`
/// may resolve to ::1 before it.
fn resolve(host: &str, port: u16) -> SocketAddr {
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .unwrap_or_else(|error| panic!("resolving {host}: {error}"))
        .collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or(addresses.first())
        .copied()
        .unwrap_or_else(|| panic!("{host} has no address"))
}

/// `database_url` with its path (the database name) replaced by `name`.
pub fn with_database(database_url: &str, name: &str) -> String {
    let (start, host_port, _) = split_database_url(database_url);
    format!("{start}{host_port}/{name}")
}

/// `database_url` with its host and port replaced by `127.0.0.1:port`.
pub fn with_port(database_url: &str, port: u16) -> String {
    let (start, _, rest) = split_database_url(database_url);
    format!("{start}127.0.0.1:{port}{rest}")
}

/// Splits `postgres://user@host:port/db?x` into `postgres://user@`, `host:port` and `/db?x`.
fn split_database_url(url: &str) -> (&str, &str, &str) {
    let scheme_end = url.find("://").expect("a URL with a scheme") + 3;
    let path_start = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |at| scheme_end + at);
    let host_start = url[scheme_end..path_start]
        .rfind('@')
        .map_or(scheme_end, |at| scheme_end + at + 1);
    (
        &url[..host_start],
        &url[host_start..path_start],
        &url[path_start..],
    )
}

/// A loopback port nothing listens on (bound, then released): a broker node that is down.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// The broker environment of a child process (the ingest, the worker, a command): `AMQP_URL`
/// and the names of `topology` ([`shared::Topology::child_env`]), for `Command::envs`.
pub fn broker_env(amqp_url: &str, topology: &shared::Topology) -> [(&'static str, String); 4] {
    topology.child_env(amqp_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_is_split_into_its_parts() {
        let url = "postgres://user:pw@db.local:6543/app?sslmode=disable";
        assert_eq!(
            with_database(url, "other"),
            "postgres://user:pw@db.local:6543/other"
        );
        assert_eq!(
            with_port(url, 7000),
            "postgres://user:pw@127.0.0.1:7000/app?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://localhost", "x"),
            "postgres://localhost/x"
        );
    }
}
