//! The last fallback of the database fixture: a private cluster started
//! from the PostgreSQL binaries on the machine.

#[tokio::test]
async fn a_private_cluster_starts_and_serves() {
    let config = trellis_test_support::postgres::start_private_cluster().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let port: String = client.query_one("SHOW port", &[]).await.unwrap().get(0);
    assert_eq!(port, config.get_ports()[0].to_string());
    assert_ne!(port, "5432", "must be its own server, not the shared one");
}
