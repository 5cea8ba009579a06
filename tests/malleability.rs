//! One signature, other bodies. Linksfield's string to sign has no escaping and no types, so a
//! captured signature also fits restructured bodies: a timestamp folded into a key, a member
//! absorbed into a value or shifted between neighbours, a string retyped, an object replaced by
//! its text, a JSON body re-sent as a form. Each case sends, under the genuine signature, what an
//! attacker would, and checks both lfguard's answer and what the backend received.

mod support;

use lfguard::signature::Encoding;
use support::*;

/// A body sent under the signature of `signed` (which must share its string to sign: the test
/// checks that the attack's premise holds, so a case cannot pass by being a plain forgery).
fn under_signature_of(signed: &str, sent: &str) -> Callback {
    let genuine = Callback::signed(signed.to_string());
    assert_eq!(
        sign_body(sent.as_bytes(), SECRET, Encoding::Hex),
        genuine.header("x-lf-md5").unwrap(),
        "the restructured body must share the signed body's string to sign"
    );
    let mut callback = genuine;
    callback.body = sent.as_bytes().to_vec();
    callback
}

fn at(mut callback: Callback, path: &str) -> Callback {
    callback.path = path.into();
    callback
}

const SCHEMAS: &str = r#"
[[routes]]
path_prefix = "/callbacks/sms-uplink"
schema = "sms_uplink"

[[routes]]
path_prefix = "/callbacks/order"
schema = "order"

[[routes]]
path_prefix = "/callbacks/no-timestamp"
require_timestamp = false

[schemas.order]
members.partner_code = { type = "string" }
members.received_at = { type = "string" }
members.amount = { type = "string" }
members.paid = { type = "string" }
members.note = { type = "string" }
members.order = { type = "object", required = false }
"#;

/// The shipped `config/lfguard.toml`'s schemas, so the documented SMS uplink's schema is what
/// these tests check.
fn shipped_schemas() -> String {
    let shipped: toml::Table = include_str!("../config/lfguard.toml").parse().unwrap();
    let mut schemas = toml::Table::new();
    schemas.insert("schemas".into(), shipped["schemas"].clone());
    toml::to_string(&schemas).unwrap()
}

fn uplink(received_at: u64, imsi: &str) -> String {
    format!(
        r#"{{"imsi":{imsi},"partner_code":"{PARTNER}","received_at":"{received_at}","sim_id":"89860220190123456789","text_message":"device status: 1234"}}"#
    )
}

/// The uplink sent to `path` with its imsi a number, under the signature of the genuine one
/// (whose imsi is a string): the retype only a schema catches.
fn imsi_retyped(received_at: u64, path: &str) -> Callback {
    at(
        under_signature_of(
            &uplink(received_at, r#""4230001234567""#),
            &uplink(received_at, "4230001234567"),
        ),
        path,
    )
}

#[test]
fn restructured_bodies_are_refused_and_never_reach_the_backend() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, &format!("{SCHEMAS}\n{}", shipped_schemas()));
    let now = now_millis();
    let three_days_ago = now - 3 * 86_400_000;
    let stale = uplink(three_days_ago, r#""4230001234567""#);
    let folded = format!(
        r#"{{"imsi":"4230001234567","partner_code":"{PARTNER}","received_at={three_days_ago}&sim_id":"89860220190123456789","text_message":"device status: 1234"}}"#
    );
    let order =
        |rest: &str| format!(r#"{{"partner_code":"{PARTNER}","received_at":"{now}",{rest}}}"#);
    let signed_order = order(r#""amount":"100","paid":"true","note":"hello&notify=true""#);
    let split_order = order(r#""amount":100,"paid":true,"note":"hello","notify":"true""#);
    let separate = order(r#""amount":"100","note":"hello","notify":"true","paid":"true""#);
    let absorbed = order(r#""amount":"100","note":"hello&notify=true","paid":"true""#);
    let shifted_signed = order(r#""aa":"x","cc":"y&bb=z""#);
    let shifted = order(r#""aa":"x&cc=y","bb":"z""#);
    let with_object = order(r#""amount":"1","paid":"1","note":"n","order":{"id":"7"}"#);
    let object_as_text = order(r#""amount":"1","paid":"1","note":"n","order":"{\"id\":\"7\"}""#);
    let genuine_uplink = uplink(now, r#""4230001234567""#);
    let form = format!(
        "imsi=4230001234567&partner_code={PARTNER}&received_at={now}&sim_id=1&text_message=hi"
    );
    let json_of_form = format!(
        r#"{{"imsi":"4230001234567","partner_code":"{PARTNER}","received_at":"{now}","sim_id":"1","text_message":"hi"}}"#
    );
    let mut as_form = under_signature_of(&json_of_form, &json_of_form)
        .replacing("Content-Type", "application/x-www-form-urlencoded");
    as_form.body = form.into_bytes();

    // (case, request, expected status and code; "" = forwarded verified)
    let cases: Vec<(&str, Callback, u16, &str)> = vec![
        (
            "the stale callback itself",
            Callback::signed(stale.clone()),
            401,
            "stale",
        ),
        (
            "its timestamp folded into a key, so no received_at member is left",
            under_signature_of(&stale, &folded),
            400,
            "ambiguous_body",
        ),
        (
            "a member absorbed into the value before it",
            under_signature_of(&separate, &absorbed),
            400,
            "ambiguous_body",
        ),
        (
            "a body whose value reads as a later member is refused itself",
            Callback::signed(signed_order.clone()),
            400,
            "ambiguous_body",
        ),
        (
            "a boundary shifted between neighbours: the admitted reading",
            Callback::signed(shifted_signed.clone()),
            200,
            "",
        ),
        (
            "a boundary shifted between neighbours: the other reading",
            under_signature_of(&shifted_signed, &shifted),
            400,
            "ambiguous_body",
        ),
        (
            "a key outside [A-Za-z0-9_.-] (Unicode normalisation twins)",
            Callback::signed(order("\"caf\u{e9}\":1,\"cafe\u{301}\":2")),
            400,
            "ambiguous_body",
        ),
        (
            "a JSON callback re-sent as a form (forms are off by default)",
            as_form,
            415,
            "unsupported_media_type",
        ),
        (
            "retyped and split off a refused value, on a schema route",
            at(
                under_signature_of(&signed_order, &split_order),
                "/callbacks/order",
            ),
            400,
            "ambiguous_body",
        ),
        (
            "an object member on its schema route",
            at(Callback::signed(with_object.clone()), "/callbacks/order"),
            200,
            "",
        ),
        (
            "that object replaced by a string of its text",
            at(
                under_signature_of(&with_object, &object_as_text),
                "/callbacks/order",
            ),
            400,
            "ambiguous_body",
        ),
        (
            "the documented SMS uplink on its schema route",
            at(
                Callback::signed(genuine_uplink.clone()),
                "/callbacks/sms-uplink",
            ),
            200,
            "",
        ),
        (
            "the uplink with its imsi retyped as a number",
            imsi_retyped(now + 1, "/callbacks/sms-uplink"),
            400,
            "ambiguous_body",
        ),
        (
            "…sent to the schema route's path in other case",
            imsi_retyped(now + 2, "/CALLBACKS/SMS-Uplink?x=1"),
            400,
            "ambiguous_body",
        ),
        (
            "…sent to the schema route's path percent-encoded (a backend decodes it)",
            imsi_retyped(now + 4, "/callbacks/%73ms-uplink"),
            400,
            "malformed_request",
        ),
        (
            "…sent to the schema route's path with an empty segment (a backend collapses it)",
            imsi_retyped(now + 5, "//callbacks/sms-uplink"),
            400,
            "malformed_request",
        ),
        (
            "the uplink with a member the schema does not name",
            at(
                Callback::signed(uplink(now + 3, r#""1","zz":"1""#)),
                "/callbacks/sms-uplink/",
            ),
            400,
            "ambiguous_body",
        ),
        (
            "a callback without any timestamp member",
            Callback::signed(format!(
                r#"{{"partner_code":"{PARTNER}","text_message":"x"}}"#
            )),
            400,
            "missing_timestamp",
        ),
        (
            "…on a route that requires none",
            at(
                Callback::signed(format!(
                    r#"{{"partner_code":"{PARTNER}","text_message":"y"}}"#
                )),
                "/callbacks/no-timestamp",
            ),
            200,
            "",
        ),
    ];
    let mut forwarded = Vec::new();
    for (name, callback, status, code) in &cases {
        let before = backend.count();
        let response = lfguard.post(callback);
        let got_code = if response.status == 200 {
            String::new()
        } else {
            response.code()
        };
        assert_eq!(
            (response.status, got_code.as_str()),
            (*status, *code),
            "{name}: {}",
            response.text()
        );
        if *status == 200 {
            forwarded.push((*name, callback.body.clone()));
            assert_eq!(backend.count(), before + 1, "{name}: not forwarded");
        } else {
            assert_eq!(backend.count(), before, "{name}: forwarded");
        }
    }
    let received = backend.requests();
    assert_eq!(received.len(), forwarded.len());
    for ((name, body), request) in forwarded.iter().zip(&received) {
        assert_eq!(&request.body.as_ref(), body, "{name}");
        assert_eq!(request.header("x-lfguard-verified"), Some("true"), "{name}");
    }

    // Counted by code, so an operator sees which callback type lacks a timestamp.
    let metrics = admin_get(lfguard.admin, "/metrics").text();
    for (code, count) in [("ambiguous_body", 10), ("missing_timestamp", 1)] {
        let series =
            format!("lfguard_requests_total{{code=\"{code}\",partner=\"{PARTNER}\"}} {count}");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
}

#[test]
fn report_mode_forwards_ambiguous_and_timestampless_bodies_marked() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, "[verify]\nmode = \"report\"");
    let now = now_millis();
    let absorbed = format!(
        r#"{{"note":"hello&notify=true","partner_code":"{PARTNER}","received_at":"{now}"}}"#
    );
    let untimed = format!(r#"{{"partner_code":"{PARTNER}","text_message":"x"}}"#);
    for (body, failure) in [(absorbed, "ambiguous_body"), (untimed, "missing_timestamp")] {
        let response = lfguard.post(&Callback::signed(body.clone()));
        assert_eq!(response.status, 200, "{failure}: {}", response.text());
        let received = backend.requests().pop().expect("forwarded");
        assert_eq!(received.body.as_ref(), body.as_bytes());
        assert_eq!(received.header("x-lfguard-verified"), Some("false"));
        assert_eq!(received.header("x-lfguard-failure"), Some(failure));
    }
}

#[test]
fn timestamps_and_forms_can_be_allowed_per_partner_and_route() {
    let backend = Backend::start();
    let lfguard = Lfguard::start(
        &backend,
        r#"
[[routes]]
path_prefix = "/forms"
accept_form = true

[partners.P700001]
secrets = ["k7"]
require_timestamp = false
"#,
    );
    let untimed = r#"{"partner_code":"P700001","text_message":"x"}"#;
    let response = lfguard.post(&Callback::signed_with(untimed, "k7", Encoding::Hex));
    assert_eq!(response.status, 200, "{}", response.text());
    // Still required for the other partners.
    let other = format!(r#"{{"partner_code":"{PARTNER}","text_message":"x"}}"#);
    assert_eq!(
        lfguard.post(&Callback::signed(other)).code(),
        "missing_timestamp"
    );

    let form = format!(
        "partner_code={PARTNER}&received_at={}&text_message=form+body",
        now_millis()
    );
    let signature = sign_body(form.as_bytes(), SECRET, Encoding::Hex);
    let callback = |path: &str| Callback {
        method: "POST".into(),
        path: path.into(),
        headers: vec![
            (
                "Content-Type".into(),
                "application/x-www-form-urlencoded".into(),
            ),
            ("x-lf-md5".into(), signature.clone()),
            ("x-lf-delivery".into(), delivery_id()),
        ],
        body: form.clone().into_bytes(),
    };
    assert_eq!(lfguard.post(&callback("/callback")).status, 415);
    let response = lfguard.post(&callback("/forms/sms"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(backend.count(), 2);
    assert_eq!(backend.requests()[1].body.as_ref(), form.as_bytes());
}

#[test]
fn the_verify_command_calls_a_restructured_body_invalid() {
    let signed = r#"{"partner_code":"P1","received_at":"1700000000000","sim_id":"1"}"#;
    let folded = r#"{"partner_code":"P1","received_at=1700000000000&sim_id":"1"}"#;
    let (_, signature, _) = run_cli(&["sign", "--secret", "s", signed], None, &[]);
    let signature = signature.trim();
    let (code, out, _) = run_cli(
        &["verify", "--secret", "s", "--signature", signature, signed],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run_cli(
        &["verify", "--secret", "s", "--signature", signature, folded],
        None,
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ambiguous body"), "{out}");
}

#[test]
fn a_route_naming_a_missing_schema_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "lfguard.toml",
        "[[routes]]\npath_prefix = \"/x\"\nschema = \"nope\"\n\n[[routes]]\npath_prefix = \"/h\"\nverify = false\nschema = \"s\"\n\n[schemas.s]\nmembers.a = { type = \"text\" }\n\n[partners.P1]\nsecrets = [\"k\"]\n",
    );
    let (code, _, err) = run_cli(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("schemas.s.members.a"), "{err}");
}

#[test]
fn the_documented_schema_example_is_the_shipped_one_and_a_valid_route() {
    let page = include_str!("../docs/verification.md");
    let block = page
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .find(|block| block.contains("[schemas.sms_uplink]"))
        .expect("docs/verification.md shows the SMS uplink schema");
    let example: toml::Table = block.parse().expect("the documented example is TOML");
    let shipped: toml::Table = include_str!("../config/lfguard.toml").parse().unwrap();
    assert_eq!(example["schemas"], shipped["schemas"]);

    // And it works as written: the route and schema admit the documented uplink only.
    let backend = Backend::start();
    let lfguard = Lfguard::start(&backend, block);
    let now = now_millis();
    let genuine = at(
        Callback::signed(uplink(now, r#""4230001234567""#)),
        "/linksfield/sms-uplink",
    );
    assert_eq!(lfguard.post(&genuine).status, 200);
    let retyped = at(
        Callback::signed(uplink(now, "4230001234567")),
        "/linksfield/sms-uplink",
    );
    assert_eq!(lfguard.post(&retyped).code(), "ambiguous_body");
    assert_eq!(backend.count(), 1);
}
