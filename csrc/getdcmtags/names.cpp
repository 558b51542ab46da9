// Names, ids and Python's text forms, as mercli.names makes them; see names.h.

#include "names.h"

#include "text.h"

#include <sys/random.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cctype>
#include <ctime>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

namespace getdcmtags {

// SHA-256 (FIPS 180-4), for safe names.
std::string sha256Hex(const std::string &message) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::string data = message;
    uint64_t bits = static_cast<uint64_t>(message.size()) * 8;
    data += static_cast<char>(0x80);
    while (data.size() % 64 != 56) data += '\0';
    for (int i = 7; i >= 0; --i) data += static_cast<char>((bits >> (8 * i)) & 0xff);
    auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
    for (size_t chunk = 0; chunk < data.size(); chunk += 64) {
        uint32_t w[64];
        for (int i = 0; i < 16; ++i) {
            const unsigned char *p =
                reinterpret_cast<const unsigned char *>(data.data() + chunk + 4 * i);
            w[i] = (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
        }
        for (int i = 16; i < 64; ++i) {
            uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        for (int i = 0; i < 64; ++i) {
            uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
            uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
    }
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h[i]);
    return std::string(out, 64);
}

// mercli.names.safe_name: a UID (digits and dots, <= 64 chars) as is, else x + hash.
std::string safeName(const std::string &value) {
    bool ok = !value.empty() && value.size() <= 64;
    bool digitBefore = false;
    for (char c : value) {
        if (!ok) break;
        if (c >= '0' && c <= '9') {
            digitBefore = true;
        } else if (c == '.' && digitBefore) {
            digitBefore = false;
        } else {
            ok = false;
        }
    }
    if (ok && digitBefore) return value;
    return "x" + sha256Hex(value).substr(0, 40);
}

// Reads the JSON string starting at s[i] (a '"'); the decoded UTF-8 text.
std::string readJsonString(const std::string &s, size_t &i) {
    std::string out;
    ++i;
    while (i < s.size() && s[i] != '"') {
        if (s[i] != '\\') {
            out += s[i++];
            continue;
        }
        char c = s[++i];
        ++i;
        switch (c) {
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u': {
                unsigned cp = std::stoul(s.substr(i, 4), nullptr, 16);
                i += 4;
                if (cp < 0x80) {
                    out += static_cast<char>(cp);
                } else if (cp < 0x800) {
                    out += static_cast<char>(0xC0 | (cp >> 6));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                } else {
                    out += static_cast<char>(0xE0 | (cp >> 12));
                    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
                    out += static_cast<char>(0x80 | (cp & 0x3F));
                }
                break;
            }
            default: out += c;
        }
    }
    ++i;  // closing quote
    return out;
}

// Python's repr() of a str (printable text assumed beyond ASCII control characters).
std::string pyRepr(const std::string &s) {
    char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"'
                                                                                        : '\'';
    std::string out(1, quote);
    for (unsigned char c : s) {
        if (c == '\\' || c == static_cast<unsigned char>(quote)) {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c == '\r') {
            out += "\\r";
        } else if (c == '\t') {
            out += "\\t";
        } else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out + quote;
}

// Python's str() of a sidecar value given as JSON: a string, a number, or a list of them.
std::string pyStr(const std::string &json) {
    size_t i = 0;
    if (json.empty()) return json;
    if (json[0] == '"') return readJsonString(json, i);
    if (json[0] != '[') return json;  // numbers: jsonFloat writes repr()
    std::string out = "[";
    i = 1;
    while (i < json.size() && json[i] != ']') {
        if (out.size() > 1) out += ", ";
        if (json[i] == '"') {
            out += pyRepr(readJsonString(json, i));
        } else {
            size_t end = json.find_first_of(",]", i);
            out += json.substr(i, end - i);
            i = end;
        }
        if (i < json.size() && json[i] == ',') ++i;
    }
    return out + "]";
}

// JSON as Python's json.dumps(ensure_ascii=True) writes a str (bad UTF-8 as surrogateescape).
std::string jsonAscii(const std::string &s) {
    std::string out = "\"";
    auto u = [&out](unsigned cp) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "\\u%04x", cp);
        out += buf;
    };
    for (size_t i = 0; i < s.size();) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c == 0x7f) {
            u(c);
            ++i;
            continue;
        }
        if (c < 0x80) {
            std::string one = jsonString(std::string(1, static_cast<char>(c)));
            out += one.substr(1, one.size() - 2);
            ++i;
            continue;
        }
        int n = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
        unsigned cp = n == 4 ? c & 0x07 : n == 3 ? c & 0x0F : c & 0x1F;
        bool ok = n > 0 && i + n <= s.size();
        for (int k = 1; ok && k < n; ++k) {
            unsigned char cc = static_cast<unsigned char>(s[i + k]);
            ok = (cc & 0xC0) == 0x80;
            cp = (cp << 6) | (cc & 0x3F);
        }
        ok = ok && !(n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp < 0xE000))) &&
             !(n == 4 && (cp < 0x10000 || cp > 0x10FFFF));
        if (!ok) {
            u(0xDC00 | c);
            ++i;
            continue;
        }
        if (cp >= 0x10000) {
            cp -= 0x10000;
            u(0xD800 | (cp >> 10));
            u(0xDC00 | (cp & 0x3FF));
        } else {
            u(cp);
        }
        i += n;
    }
    return out + "\"";
}

// --- time and ids --------------------------------------------------------------------------------

Clock now() {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    Clock clock;
    gmtime_r(&ts.tv_sec, &clock.utc);
    clock.micros = ts.tv_nsec / 1000;
    return clock;
}

// datetime.isoformat(timespec=...) of an aware UTC time: digits 0, 3 or 6.
std::string isoformat(const Clock &clock, int digits) {
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &clock.utc);
    std::string out = buf;
    if (digits == 3) {
        std::snprintf(buf, sizeof buf, ".%03ld", clock.micros / 1000);
        out += buf;
    } else if (digits == 6) {
        std::snprintf(buf, sizeof buf, ".%06ld", clock.micros);
        out += buf;
    }
    return out + "+00:00";
}

std::string randomHex(size_t bytes) {
    std::vector<unsigned char> raw(bytes);
    size_t got = 0;
    while (got < bytes) {
        ssize_t n = getrandom(raw.data() + got, bytes - got, 0);
        if (n < 0 && errno != EINTR) throw std::runtime_error("getrandom failed");
        if (n > 0) got += static_cast<size_t>(n);
    }
    std::string out;
    char buf[3];
    for (unsigned char c : raw) {
        std::snprintf(buf, sizeof buf, "%02x", c);
        out += buf;
    }
    return out;
}

// mercli.names.new_id: 20261128T002729.123456-3f9a1c2b7d4e
std::string newId() {
    Clock clock = now();
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%S", &clock.utc);
    char micros[16];
    std::snprintf(micros, sizeof micros, ".%06ld-", clock.micros);
    return buf + std::string(micros) + randomHex(6);
}

std::string nodename() {
    struct utsname name;
    if (uname(&name) != 0) return "";
    return name.nodename;
}

// mercli.names.owner_id("getdcmtags")
std::string ownerId() {
    std::string host = nodename();
    for (char &c : host)
        if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-') c = '-';
    host = host.substr(0, 40);
    if (host.empty()) host = "host";
    return "getdcmtags." + host + "." + std::to_string(getpid()) + "." + randomHex(4);
}

}  // namespace getdcmtags
