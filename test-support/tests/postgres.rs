//! Each test gets its own, real PostgreSQL database.

use trellis_test_support::TestDb;

#[tokio::test]
async fn two_test_databases_are_separate_postgres_databases() {
    let first = TestDb::new().await.unwrap();
    let second = TestDb::new().await.unwrap();
    assert_ne!(first.name(), second.name());

    let a = first.connect().await.unwrap();
    let b = second.connect().await.unwrap();

    // Each connection is in the database it was given, on a real server.
    let name_a: String = a
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let name_b: String = b
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name_a, first.name());
    assert_eq!(name_b, second.name());
    let oid_a: u32 = a
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let oid_b: u32 = b
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(oid_a, oid_b);

    // What one test writes, the other cannot see: the same table name holds
    // different rows in each.
    a.batch_execute("CREATE TABLE things (name text); INSERT INTO things VALUES ('from-a')")
        .await
        .unwrap();
    let missing = b.query("SELECT * FROM things", &[]).await.unwrap_err();
    assert_eq!(
        missing.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
    );
    b.batch_execute("CREATE TABLE things (name text); INSERT INTO things VALUES ('from-b')")
        .await
        .unwrap();
    let in_a: String = a
        .query_one("SELECT name FROM things", &[])
        .await
        .unwrap()
        .get(0);
    let in_b: String = b
        .query_one("SELECT name FROM things", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((in_a.as_str(), in_b.as_str()), ("from-a", "from-b"));
}

#[tokio::test]
async fn a_test_database_is_dropped_with_its_guard() {
    let db = TestDb::new().await.unwrap();
    let name = db.name().to_owned();
    let admin = db.config().clone();
    drop(db);
    let mut admin = admin;
    admin.dbname("postgres");
    let (client, connection) = admin.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "{name} should have been dropped");
}
