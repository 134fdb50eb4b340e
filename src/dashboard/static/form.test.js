// Tests of form.js's conversions and checks, with node's own runner:
//   node --test src/dashboard/static/form.test.js
// (run by `cargo test -p trellis --test dashboard_form_js`). The DOM half of
// form.js is exercised in a browser by the dashboard's browser test.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const f = require('./form.js');

const okv = (value) => ({ ok: true, value });

test('32-bit integers become numbers within their range', () => {
  assert.deepEqual(f.parseScalar('int32', '42'), okv(42));
  assert.deepEqual(f.parseScalar('sint32', ' -7 '), okv(-7));
  assert.deepEqual(f.parseScalar('int32', '2147483647'), okv(2147483647));
  assert.deepEqual(f.parseScalar('fixed32', '4294967295'), okv(4294967295));
  assert.deepEqual(f.parseScalar('int32', '12x'), { ok: false, message: '"12x" is not an integer' });
  assert.deepEqual(f.parseScalar('int32', '1.5'), { ok: false, message: '"1.5" is not an integer' });
  assert.deepEqual(f.parseScalar('int32', '2147483648'), {
    ok: false, message: '"2147483648" is out of range for int32 (-2147483648 to 2147483647)',
  });
  assert.deepEqual(f.parseScalar('uint32', '-1'), {
    ok: false, message: '"-1" is negative; uint32 takes 0 to 4294967295',
  });
});

test('64-bit integers stay exact decimal strings', () => {
  assert.deepEqual(f.parseScalar('int64', '9223372036854775807'), okv('9223372036854775807'));
  assert.deepEqual(f.parseScalar('int64', '-9223372036854775808'), okv('-9223372036854775808'));
  assert.deepEqual(f.parseScalar('uint64', '18446744073709551615'), okv('18446744073709551615'));
  assert.deepEqual(f.parseScalar('sfixed64', '+0012'), okv('12'));
  assert.equal(f.parseScalar('int64', '9223372036854775808').ok, false);
  assert.match(f.parseScalar('int64', '9223372036854775808').message, /out of range for int64/);
  assert.match(f.parseScalar('uint64', '-5').message, /negative; uint64/);
  assert.match(f.parseScalar('fixed64', '1e3').message, /is not an integer/);
});

test('floats and doubles', () => {
  assert.deepEqual(f.parseScalar('double', '1.5'), okv(1.5));
  assert.deepEqual(f.parseScalar('double', '-.5e3'), okv(-500));
  assert.deepEqual(f.parseScalar('float', 'NaN'), okv('NaN'));
  assert.deepEqual(f.parseScalar('double', '-Infinity'), okv('-Infinity'));
  assert.deepEqual(f.parseScalar('double', 'abc'), { ok: false, message: '"abc" is not a number' });
  assert.match(f.parseScalar('float', '1e39').message, /out of range for float/);
  assert.match(f.parseScalar('double', '1e309').message, /out of range for double/);
});

test('bools, strings and map keys', () => {
  assert.deepEqual(f.parseScalar('bool', 'true'), okv(true));
  assert.equal(f.parseScalar('bool', 'yes').ok, false);
  assert.deepEqual(f.parseScalar('string', '  kept as typed '), okv('  kept as typed '));
  assert.deepEqual(f.parseMapKey('int64', '007'), okv('7'));
  assert.deepEqual(f.parseMapKey('int32', '5'), okv('5'));
  assert.deepEqual(f.parseMapKey('bool', 'false'), okv('false'));
  assert.equal(f.parseMapKey('uint32', '-1').ok, false);
});

test('bytes are base64, standard or URL-safe, padded or not', () => {
  for (const good of ['', 'AAAA', 'aGVsbG8=', 'aGVsbG8', 'aGk=', 'aGk', '-_-_', 'a+b/']) {
    assert.deepEqual(f.parseBytes(good), okv(good), good);
  }
  assert.deepEqual(f.parseBytes('%%'), { ok: false, message: '"%%" is not base64' });
  assert.equal(f.parseBytes('a+b_').ok, false); // two alphabets mixed
  assert.match(f.parseBytes('AAAAA').message, /length/);
  assert.match(f.parseBytes('aGk==').message, /length/);
});

test('timestamps are RFC 3339', () => {
  for (const good of ['2026-12-02T10:00:00Z', '2024-02-29T23:59:59.123456789Z', '2026-12-02T12:00:00+02:00',
    '0001-01-01T00:00:00Z', '9999-12-31T23:59:59Z']) {
    assert.deepEqual(f.parseTimestamp(good), okv(good), good);
  }
  for (const bad of ['yesterday', '2026-12-02', '2026-12-02 10:00:00Z', '2026-12-02T10:00:00',
    '2023-02-29T00:00:00Z', '2026-13-01T00:00:00Z', '2026-12-02T24:00:00Z', '2026-12-02T10:00:00.Z',
    '0000-01-01T00:00:00Z', '2026-12-02T10:00:00+25:00', '0100-02-29T00:00:00Z']) {
    const r = f.parseTimestamp(bad);
    assert.equal(r.ok, false, bad);
    assert.equal(r.message, `${JSON.stringify(bad)} is not an RFC 3339 time like 2026-12-02T10:00:00Z`);
  }
});

test('durations are seconds with an s', () => {
  for (const good of ['1.5s', '0s', '-2s', '0.000000001s', '315576000000s']) {
    assert.deepEqual(f.parseDuration(good), okv(good), good);
  }
  for (const bad of ['5', '1.5', '1m', '1.5 s', '1.0000000001s', 's']) {
    assert.equal(f.parseDuration(bad).ok, false, bad);
  }
  assert.match(f.parseDuration('5').message, /is not a duration like 1.5s/);
  assert.match(f.parseDuration('315576000001s').message, /longer than 10000 years/);
});

test('field masks', () => {
  assert.deepEqual(f.parseFieldMask('a.b, c'), okv('a.b,c'));
  assert.deepEqual(f.parseFieldMask('userId'), okv('userId'));
  assert.deepEqual(f.parseFieldMask(''), okv(''));
  assert.deepEqual(f.parseFieldMask('a..b'), { ok: false, message: '"a..b" is not a field path like a.b' });
});

test('Struct, Value, ListValue and Any are JSON text of the right shape', () => {
  assert.deepEqual(f.parseJsonText('google.protobuf.Struct', '{"a": [1, null]}'), okv({ a: [1, null] }));
  assert.deepEqual(f.parseJsonText('google.protobuf.Value', '"x"'), okv('x'));
  assert.deepEqual(f.parseJsonText('google.protobuf.ListValue', '[1]'), okv([1]));
  const any = { '@type': 'type.googleapis.com/telco.user.v1.GetUserRequest', userId: 'u1' };
  assert.deepEqual(f.parseJsonText('google.protobuf.Any', JSON.stringify(any)), okv(any));
  assert.match(f.parseJsonText('google.protobuf.Value', '{a:1}').message, /^is not JSON: /);
  assert.equal(f.parseJsonText('google.protobuf.Struct', '[1]').message, 'must be a JSON object {…}');
  assert.equal(f.parseJsonText('google.protobuf.ListValue', '{}').message, 'must be a JSON array […]');
  assert.match(f.parseJsonText('google.protobuf.Any', '{"userId": "u1"}').message, /"@type"/);
});

test('well-known types dispatch to their parser', () => {
  assert.deepEqual(f.parseWellKnown('google.protobuf.Int64Value', '12'), okv('12'));
  assert.deepEqual(f.parseWellKnown('google.protobuf.UInt32Value', '12'), okv(12));
  assert.deepEqual(f.parseWellKnown('google.protobuf.BoolValue', 'false'), okv(false));
  assert.deepEqual(f.parseWellKnown('google.protobuf.BytesValue', 'AAAA'), okv('AAAA'));
  assert.equal(f.parseWellKnown('google.protobuf.DoubleValue', 'x').ok, false);
  assert.equal(f.parseWellKnown('google.protobuf.Timestamp', 'x').ok, false);
  assert.deepEqual(f.parseWellKnown('google.protobuf.Duration', '3s'), okv('3s'));
  assert.deepEqual(f.parseWellKnown('google.protobuf.FieldMask', 'a'), okv('a'));
  assert.deepEqual(f.parseWellKnown('google.protobuf.Empty', ''), okv({}));
});

test('labels describe a field type', () => {
  const field = (o) => ({ kind: 'string', type: null, repeated: false, map: null, optional: false, ...o });
  assert.equal(f.describeType(field({})), 'string');
  assert.equal(f.describeType(field({ kind: 'enum', type: 'telco.usage.v1.UsageType' })), 'UsageType');
  assert.equal(f.describeType(field({ kind: 'message', type: 'telco.user.v1.Plan', repeated: true })), 'repeated Plan');
  assert.equal(f.describeType(field({ kind: 'int32', optional: true })), 'optional int32');
  assert.equal(f.describeType(field({
    kind: 'map', map: { key: { kind: 'string' }, value: { kind: 'wkt', type: 'google.protobuf.Timestamp' } },
  })), 'map<string, Timestamp>');
});

test('initial values read as text', () => {
  assert.equal(f.toText(undefined), '');
  assert.equal(f.toText(null), '');
  assert.equal(f.toText(12), '12');
  assert.equal(f.toText('12'), '12');
  assert.equal(f.toText({ a: 1 }, true), '{\n  "a": 1\n}');
});
