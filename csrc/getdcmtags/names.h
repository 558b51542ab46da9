#ifndef GETDCMTAGS_NAMES_H
#define GETDCMTAGS_NAMES_H

// What the publish mode shares with mercli.names and Python's text forms: safe folder names,
// item and owner ids, times, and str()/json.dumps() of sidecar values.

#include <time.h>

#include <cstddef>
#include <string>

namespace getdcmtags {

// mercli.names.safe_name: a UID (digits and dots, <= 64 chars) as is, else x + hash.
std::string safeName(const std::string &value);

// Python's str() of a sidecar value given as JSON: a string, a number, or a list of them.
std::string pyStr(const std::string &json);

// JSON as Python's json.dumps(ensure_ascii=True) writes a str (bad UTF-8 as surrogateescape).
std::string jsonAscii(const std::string &s);

struct Clock {
    struct tm utc;
    long micros;
};

Clock now();

// datetime.isoformat(timespec=...) of an aware UTC time: digits 0, 3 or 6.
std::string isoformat(const Clock &clock, int digits);

// mercli.names.new_id: 20261128T002729.123456-3f9a1c2b7d4e
std::string newId();

std::string nodename();

// mercli.names.owner_id("getdcmtags")
std::string ownerId();

}  // namespace getdcmtags

#endif  // GETDCMTAGS_NAMES_H
