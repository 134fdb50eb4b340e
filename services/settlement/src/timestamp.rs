//! `google.protobuf.Timestamp` -> `time::OffsetDateTime` at the gRPC boundary
//! (the other way is `trellis::events::to_timestamp`).

use prost_types::Timestamp;
use time::OffsetDateTime;

/// The instant `ts` names, truncated to whole microseconds (PostgreSQL's
/// precision, so that the instant stored is the instant computed with);
/// `None` if its nanoseconds are out of range or it lies outside the years
/// -9999 to 9999.
pub fn from_proto(ts: &Timestamp) -> Option<OffsetDateTime> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    let micros = i128::from(ts.nanos / 1_000);
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + micros * 1_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_at_microsecond_precision() {
        let ts = Timestamp {
            seconds: 1_735_689_600,
            nanos: 123_456_789,
        };
        let instant = from_proto(&ts).unwrap();
        assert_eq!(
            trellis::events::to_timestamp(instant),
            Timestamp {
                seconds: 1_735_689_600,
                nanos: 123_456_000
            }
        );
    }

    #[test]
    fn rejects_what_cannot_be_an_instant() {
        let bad_nanos = Timestamp {
            seconds: 0,
            nanos: 1_000_000_000,
        };
        assert_eq!(from_proto(&bad_nanos), None);
        let negative_nanos = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(from_proto(&negative_nanos), None);
        let far = Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(from_proto(&far), None);
    }
}
