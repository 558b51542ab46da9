// JSON values and Python's number parsing; see text.h.

#include "text.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace getdcmtags {

// --- JSON values -------------------------------------------------------------------------------

std::string jsonString(const std::string &s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", c);
                    out += buf;
                } else {
                    out += static_cast<char>(c);
                }
        }
    }
    return out + "\"";
}

Json textValue(const std::string &s) { return Json{jsonString(s), s.empty()}; }

// `x` as Python's repr(float) writes it: the shortest digits that read back to `x`, in fixed
// notation with at least one decimal (5.0) when 1e-4 <= |x| < 1e16, else as 1.5e-05.
std::string jsonFloat(double x) {
    char buf[40];
    for (int precision = 0; precision <= 16; ++precision) {
        std::snprintf(buf, sizeof buf, "%.*e", precision, x);
        if (std::strtod(buf, nullptr) == x) break;
    }
    std::string text = buf;  // [-]d[.ddd]e[+-]XX
    size_t e = text.find('e');
    int exponent = std::atoi(text.c_str() + e + 1);
    bool negative = text[0] == '-';
    std::string digits;
    for (size_t i = negative ? 1 : 0; i < e; ++i)
        if (text[i] != '.') digits += text[i];
    std::string out = negative ? "-" : "";
    if (exponent < -4 || exponent >= 16) {
        out += digits.substr(0, 1);
        if (digits.size() > 1) out += "." + digits.substr(1);
        char exp[16];
        std::snprintf(exp, sizeof exp, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        return out + exp;
    }
    if (exponent < 0) return out + "0." + std::string(-exponent - 1, '0') + digits;
    if (digits.size() <= static_cast<size_t>(exponent) + 1)
        return out + digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
    return out + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

// FL: the shortest decimal (1 to 9 digits) whose nearest 32-bit float is `f` itself.
double shortestFloat32(float f) {
    char buf[40];
    for (int digits = 1; digits <= 9; ++digits) {
        std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(f));
        double candidate = std::strtod(buf, nullptr);
        if (std::fabs(candidate) > 3.4028234663852886e38) continue;  // past the float32 range
        float back = static_cast<float>(candidate);
        if (std::memcmp(&back, &f, sizeof f) == 0) return candidate;
    }
    return static_cast<double>(f);
}

Json binaryFloat(double x, bool isFL) {
    if (std::isnan(x)) return textValue("nan");
    if (std::isinf(x)) return textValue(x > 0 ? "inf" : "-inf");
    return Json{jsonFloat(isFL ? shortestFloat32(static_cast<float>(x)) : x)};
}

// --- text to numbers, as Python's int() and float() read it ------------------------------------

bool isPySpace(unsigned char c) {
    return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
           c == 0xA0;
}

std::string pyStrip(const std::string &s) {
    size_t b = 0, e = s.size();
    while (b < e && isPySpace(static_cast<unsigned char>(s[b]))) ++b;
    while (e > b && isPySpace(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
}

std::string rstripChars(const std::string &s, const char *chars, size_t n) {
    size_t e = s.size();
    while (e > 0 && std::memchr(chars, s[e - 1], n) != nullptr) --e;
    return s.substr(0, e);
}

std::string rstripSpaceNul(const std::string &s) { return rstripChars(s, " \0", 2); }

// Digits with single underscores between them (Python literal rules); appends the digits.
bool scanDigits(const std::string &s, size_t &i, std::string &digits) {
    size_t start = i;
    while (i < s.size()) {
        if (std::isdigit(static_cast<unsigned char>(s[i]))) {
            digits += s[i++];
        } else if (s[i] == '_' && i > start && i + 1 < s.size() &&
                   std::isdigit(static_cast<unsigned char>(s[i + 1])) &&
                   std::isdigit(static_cast<unsigned char>(s[i - 1]))) {
            ++i;
        } else {
            break;
        }
    }
    return i > start;
}

// Python int(text): optional sign and decimal digits; the canonical digits on success.
bool pyInt(const std::string &text, std::string &out) {
    std::string s = pyStrip(text);
    size_t i = 0;
    bool negative = false;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) negative = s[i++] == '-';
    std::string digits;
    if (!scanDigits(s, i, digits) || i != s.size()) return false;
    size_t nz = digits.find_first_not_of('0');
    digits = nz == std::string::npos ? "0" : digits.substr(nz);
    out = (negative && digits != "0" ? "-" : "") + digits;
    return true;
}

bool equalsNoCase(const std::string &a, const char *b) {
    if (a.size() != std::strlen(b)) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(a[i])) != b[i]) return false;
    return true;
}

// Python float(text): decimal floats, inf/infinity/nan; no hex (which strtod would accept).
bool pyFloat(const std::string &text, double &out) {
    std::string s = pyStrip(text);
    size_t i = 0;
    std::string clean;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
    std::string rest = s.substr(i);
    if (equalsNoCase(rest, "inf") || equalsNoCase(rest, "infinity") || equalsNoCase(rest, "nan")) {
        out = std::strtod((clean + rest).c_str(), nullptr);
        return true;
    }
    bool whole = scanDigits(s, i, clean);
    bool fraction = false;
    if (i < s.size() && s[i] == '.') {
        clean += s[i++];
        fraction = scanDigits(s, i, clean);
    }
    if (!whole && !fraction) return false;
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        clean += s[i++];
        if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
        if (!scanDigits(s, i, clean)) return false;
    }
    if (i != s.size()) return false;
    out = std::strtod(clean.c_str(), nullptr);
    return true;
}

// IS: an integer, or a float that is one ("1.0"); otherwise the text itself.
Json intFromText(const std::string &text) {
    std::string digits;
    if (pyInt(text, digits)) return Json{digits};
    double number;
    if (!pyFloat(text, number) || !std::isfinite(number) || number != std::floor(number))
        return textValue(text);
    char buf[400];
    std::snprintf(buf, sizeof buf, "%.0f", number);
    return Json{std::string(buf) == "-0" ? "0" : buf};
}

// DS: a float; NaN, infinite or unparseable stays the text.
Json floatFromText(const std::string &text) {
    double number;
    if (!pyFloat(text, number) || !std::isfinite(number)) return textValue(text);
    return Json{jsonFloat(number)};
}

std::string latin1ToUtf8(const std::string &s) {
    std::string out;
    out.reserve(s.size());
    for (unsigned char c : s) {
        if (c < 0x80) {
            out += static_cast<char>(c);
        } else {
            out += static_cast<char>(0xC0 | (c >> 6));
            out += static_cast<char>(0x80 | (c & 0x3F));
        }
    }
    return out;
}

std::vector<std::string> split(const std::string &s, char delimiter) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (;;) {
        size_t pos = s.find(delimiter, start);
        parts.push_back(s.substr(start, pos == std::string::npos ? pos : pos - start));
        if (pos == std::string::npos) return parts;
        start = pos + 1;
    }
}

bool startsWith(const std::string &s, const char *prefix) {
    return s.compare(0, std::strlen(prefix), prefix) == 0;
}

}  // namespace getdcmtags
