//! Faults an instance adds to its calls on request (`Inject`, or the
//! `--delay`, `--fail-code` and `--fail-ratio` flags): a delay before each
//! call answers, and a share of calls that fail with a given status.

use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use trellis::pb::trellis::echo::v1 as pb;
use trellis::status::FieldViolations;

/// The longest delay accepted: long enough for any test, short enough that
/// a typo (`10h` for `10s`) is caught rather than hanging every call.
pub const MAX_DELAY: Duration = Duration::from_secs(60 * 60);

/// The faults in force on an instance. The default adds none.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    delay: Duration,
    /// The status failing calls get and the share (0 < ratio <= 1) of calls
    /// that fail; `None` fails no call.
    failure: Option<(Code, f64)>,
}

/// One field of a fault request that is out of range, by the name of its
/// `InjectRequest` field (`delay`, `fail_code`, `fail_ratio`).
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// The `InjectRequest` field at fault.
    pub field: &'static str,
    /// What is wrong with it and what is accepted, for a person.
    pub description: String,
}

/// Every field of a fault request that is out of range.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidFaults(pub Vec<Violation>);

impl fmt::Display for InvalidFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidFaults {}

impl From<InvalidFaults> for Status {
    /// INVALID_ARGUMENT naming every field at fault, with a
    /// `google.rpc.BadRequest` carrying the same violations.
    fn from(invalid: InvalidFaults) -> Self {
        let mut violations = FieldViolations::new();
        for v in invalid.0 {
            violations.add(v.field, v.description);
        }
        violations
            .check()
            .expect_err("InvalidFaults holds at least one violation")
    }
}

impl Faults {
    /// Faults adding `delay` to every call and failing a share
    /// `fail_ratio` of them with status `fail_code` (0: none fail).
    ///
    /// Errors name every field out of range: `delay` over [`MAX_DELAY`],
    /// `fail_code` not 0 to 16, `fail_ratio` not 0 to 1, and a
    /// `fail_ratio` above 0 with `fail_code` 0, which asks for failures
    /// without saying which (most likely a forgotten code).
    pub fn new(delay: Duration, fail_code: i32, fail_ratio: f64) -> Result<Self, InvalidFaults> {
        let mut violations = Vec::new();
        let mut violation = |field, description: String| {
            violations.push(Violation { field, description });
        };
        if delay > MAX_DELAY {
            violation(
                "delay",
                format!("must be at most 1h, got {}s", delay.as_secs()),
            );
        }
        // `Code::from_i32` maps unknown numbers to UNKNOWN (2); only a
        // number that round-trips is a real code.
        let code = Code::from_i32(fail_code);
        if code as i32 != fail_code {
            violation(
                "fail_code",
                format!(
                    "must be 0 (no failures) or a gRPC status code from 1 to 16 \
                     (e.g. 14 for UNAVAILABLE), got {fail_code}"
                ),
            );
        }
        if !(0.0..=1.0).contains(&fail_ratio) {
            violation(
                "fail_ratio",
                format!(
                    "must be from 0 to 1 (the share of calls that fail; 1 fails \
                     every call), got {fail_ratio}"
                ),
            );
        } else if fail_ratio > 0.0 && fail_code == 0 {
            violation(
                "fail_ratio",
                format!(
                    "is {fail_ratio} but fail_code is 0 (no failures): set fail_code \
                     to the status to fail with (1 to 16), or fail_ratio to 0"
                ),
            );
        }
        if !violations.is_empty() {
            return Err(InvalidFaults(violations));
        }
        let failure = (code != Code::Ok && fail_ratio > 0.0).then_some((code, fail_ratio));
        Ok(Self { delay, failure })
    }

    /// The delay added before each call answers.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The status failing calls get and the share of calls that fail, if
    /// any fail.
    pub fn failure(&self) -> Option<(Code, f64)> {
        self.failure
    }

    /// Whether these faults change nothing.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Waits out the delay, then fails the call (naming `instance`) if it
    /// falls in the failing share. Cancelled with the call, like any
    /// handler work.
    pub async fn apply(&self, instance: &str) -> Result<(), Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match self.failure {
            Some((code, ratio)) if rand::random_bool(ratio) => Err(Status::new(
                code,
                format!("fault injected on echo instance {instance}"),
            )),
            _ => Ok(()),
        }
    }
}

impl TryFrom<pb::InjectRequest> for Faults {
    type Error = InvalidFaults;

    fn try_from(request: pb::InjectRequest) -> Result<Self, Self::Error> {
        // A negative delay is reported with the other fields; checking the
        // rest against a zero delay loses nothing.
        let (delay, negative) = match request.delay.map(Duration::try_from) {
            None => (Duration::ZERO, false),
            Some(Ok(delay)) => (delay, false),
            Some(Err(_)) => (Duration::ZERO, true),
        };
        let faults = Faults::new(delay, request.fail_code, request.fail_ratio);
        if !negative {
            return faults;
        }
        let mut violations = vec![Violation {
            field: "delay",
            description: "must be a non-negative duration".to_owned(),
        }];
        if let Err(InvalidFaults(others)) = faults {
            violations.extend(others);
        }
        Err(InvalidFaults(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(result: Result<Faults, InvalidFaults>) -> Vec<&'static str> {
        result.unwrap_err().0.iter().map(|v| v.field).collect()
    }

    #[test]
    fn an_empty_request_clears_every_fault() {
        let faults = Faults::try_from(pb::InjectRequest::default()).unwrap();
        assert!(faults.is_none());
        assert_eq!(faults, Faults::default());
    }

    #[test]
    fn accepts_the_bounds() {
        let faults = Faults::new(MAX_DELAY, 16, 1.0).unwrap();
        assert_eq!(faults.delay(), MAX_DELAY);
        assert_eq!(faults.failure(), Some((Code::Unauthenticated, 1.0)));
        // A code with no share fails nothing.
        assert_eq!(
            Faults::new(Duration::ZERO, 14, 0.0).unwrap().failure(),
            None
        );
    }

    #[test]
    fn names_every_field_out_of_range() {
        assert_eq!(
            fields(Faults::new(MAX_DELAY + Duration::from_secs(1), 17, 1.5)),
            ["delay", "fail_code", "fail_ratio"]
        );
        assert_eq!(fields(Faults::new(Duration::ZERO, -1, 0.0)), ["fail_code"]);
        assert_eq!(
            fields(Faults::new(Duration::ZERO, 14, -0.1)),
            ["fail_ratio"]
        );
        assert_eq!(
            fields(Faults::new(Duration::ZERO, 14, f64::NAN)),
            ["fail_ratio"]
        );
        // A share of failures with no code to fail with.
        let invalid = Faults::new(Duration::ZERO, 0, 0.5).unwrap_err();
        assert!(invalid.to_string().contains("fail_code is 0"), "{invalid}");
    }

    #[test]
    fn a_negative_delay_is_reported_with_the_other_fields() {
        let request = pb::InjectRequest {
            delay: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            fail_code: 99,
            fail_ratio: 0.0,
        };
        assert_eq!(fields(Faults::try_from(request)), ["delay", "fail_code"]);
    }

    #[test]
    fn becomes_invalid_argument_with_field_violations() {
        use tonic_types::StatusExt;
        let status = Status::from(Faults::new(Duration::ZERO, 20, 2.0).unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("fail_code: must be 0"),
            "{status:?}"
        );
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let named: Vec<&str> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(named, ["fail_code", "fail_ratio"]);
    }

    #[tokio::test(start_paused = true)]
    async fn delays_then_fails_with_the_code() {
        let faults = Faults::new(Duration::from_millis(300), 14, 1.0).unwrap();
        let started = tokio::time::Instant::now();
        let status = faults.apply("a").await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("instance a"), "{status:?}");
    }

    #[tokio::test]
    async fn fails_about_the_share_asked() {
        let faults = Faults::new(Duration::ZERO, 13, 0.25).unwrap();
        let mut failed = 0;
        for _ in 0..4000 {
            if let Err(status) = faults.apply("a").await {
                assert_eq!(status.code(), Code::Internal);
                failed += 1;
            }
        }
        // 1000 expected; the standard deviation is about 27.
        assert!((850..1150).contains(&failed), "{failed} of 4000 failed");
        for _ in 0..100 {
            Faults::default().apply("a").await.unwrap();
        }
    }
}
