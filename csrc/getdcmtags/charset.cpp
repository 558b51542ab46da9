// Specific Character Set decoding as pydicom does it; see charset.h.

#include "charset.h"

#include "sidecar.h"
#include "text.h"

namespace getdcmtags {

// Defined terms of (0008,0005) and the Python codec pydicom decodes each with
// (pydicom.charset.python_encoding); mirrored so that both tools decode alike.
const std::pair<const char *, const char *> kTerms[] = {
    {"", "iso8859"}, {"ISO_IR 6", "iso8859"}, {"ISO_IR 13", "shift_jis"},
    {"ISO_IR 100", "latin_1"}, {"ISO_IR 101", "iso8859_2"}, {"ISO_IR 109", "iso8859_3"},
    {"ISO_IR 110", "iso8859_4"}, {"ISO_IR 126", "iso_ir_126"}, {"ISO_IR 127", "iso_ir_127"},
    {"ISO_IR 138", "iso_ir_138"}, {"ISO_IR 144", "iso_ir_144"}, {"ISO_IR 148", "iso_ir_148"},
    {"ISO_IR 166", "iso_ir_166"}, {"ISO 2022 IR 6", "iso8859"}, {"ISO 2022 IR 13", "shift_jis"},
    {"ISO 2022 IR 87", "iso2022_jp"}, {"ISO 2022 IR 100", "latin_1"},
    {"ISO 2022 IR 101", "iso8859_2"}, {"ISO 2022 IR 109", "iso8859_3"},
    {"ISO 2022 IR 110", "iso8859_4"}, {"ISO 2022 IR 126", "iso_ir_126"},
    {"ISO 2022 IR 127", "iso_ir_127"}, {"ISO 2022 IR 138", "iso_ir_138"},
    {"ISO 2022 IR 144", "iso_ir_144"}, {"ISO 2022 IR 148", "iso_ir_148"},
    {"ISO 2022 IR 149", "euc_kr"}, {"ISO 2022 IR 159", "iso2022_jp_2"},
    {"ISO 2022 IR 166", "iso_ir_166"}, {"ISO 2022 IR 58", "iso_ir_58"}, {"ISO_IR 192", "UTF8"},
    {"GB18030", "GB18030"}, {"ISO 2022 GBK", "GBK"}, {"ISO 2022 58", "GB2312"}, {"GBK", "GBK"},
};

// Escape sequences (PS3.5 §6.1.2.5) and the codec of the text after them (pydicom's
// CODES_TO_ENCODINGS).
const std::pair<const char *, const char *> kEscapes[] = {
    {"\x1b(B", "iso8859"}, {"\x1b-A", "latin_1"}, {"\x1b)I", "shift_jis"},
    {"\x1b(J", "shift_jis"}, {"\x1b$B", "iso2022_jp"}, {"\x1b-B", "iso8859_2"},
    {"\x1b-C", "iso8859_3"}, {"\x1b-D", "iso8859_4"}, {"\x1b-F", "iso_ir_126"},
    {"\x1b-G", "iso_ir_127"}, {"\x1b-H", "iso_ir_138"}, {"\x1b-L", "iso_ir_144"},
    {"\x1b-M", "iso_ir_148"}, {"\x1b-T", "iso_ir_166"}, {"\x1b$)C", "euc_kr"},
    {"\x1b$(D", "iso2022_jp_2"}, {"\x1b$)A", "iso_ir_58"},
};

// The iconv name for each Python codec. Python's shift_jis keeps 0x5C and 0x7E as ASCII
// (glibc's SHIFT_JIS makes them YEN SIGN and OVERLINE), as CP932 does.
const std::pair<const char *, const char *> kIconvNames[] = {
    {"shift_jis", "CP932"}, {"iso8859_2", "ISO-8859-2"}, {"iso8859_3", "ISO-8859-3"},
    {"iso8859_4", "ISO-8859-4"}, {"iso_ir_126", "ISO-8859-7"}, {"iso_ir_127", "ISO-8859-6"},
    {"iso_ir_138", "ISO-8859-8"}, {"iso_ir_144", "ISO-8859-5"}, {"iso_ir_148", "ISO-8859-9"},
    {"iso_ir_166", "TIS-620"}, {"iso2022_jp", "ISO-2022-JP"}, {"iso2022_jp_2", "ISO-2022-JP-2"},
    {"euc_kr", "EUC-KR"}, {"iso_ir_58", "GB2312"}, {"UTF8", "UTF-8"}, {"GB18030", "GB18030"},
    {"GBK", "GBK"}, {"GB2312", "GB2312"},
};

// Codecs that read their own escape sequences; for the others pydicom strips them.
const char *const kEscapeAware[] = {"iso2022_jp", "iso2022_jp_2", "iso_ir_58"};
const char *const kStandAlone[] = {"ISO_IR 192", "GBK", "GB18030"};

// The codec for a defined term as pydicom picks it: common misspellings ("ISO IR 100",
// "ISO-2022-IR 87") corrected, anything else unknown read as the default (ISO 8859-1).
std::string codecForTerm(const std::string &term) {
    if (const char *codec = lookup(kTerms, term)) return codec;
    std::string patched;
    if (term.size() >= 6 && startsWith(term, "ISO") && term[3] != '_' &&
        term.compare(4, 2, "IR") == 0) {
        patched = "ISO_IR" + term.substr(6);
    } else if (term.size() >= 12 && startsWith(term, "ISO") && term.compare(4, 4, "2022") == 0 &&
               term.compare(9, 2, "IR") == 0 && !startsWith(term, "ISO 2022 IR ")) {
        patched = "ISO 2022 IR " + term.substr(12);
    }
    if (const char *codec = patched.empty() ? nullptr : lookup(kTerms, patched)) return codec;
    return "iso8859";
}

bool isLatin1(const std::string &codec) { return codec == "iso8859" || codec == "latin_1"; }

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

TextDecoder::TextDecoder(const std::string *rawCharset) {
    if (rawCharset == nullptr) {
        codecs_.push_back("iso8859");
        return;
    }
    std::vector<std::string> terms = split(rstripSpaceNul(*rawCharset), '\\');
    if (terms.size() > 1 && terms[0].empty()) terms[0] = "ISO_IR 6";
    for (size_t i = 0; i < terms.size(); ++i) {
        if (i == 0 || !inList(terms[i], kStandAlone)) codecs_.push_back(codecForTerm(terms[i]));
        if (i == 0 && inList(terms[0], kStandAlone)) break;  // allows no code extensions
    }
}

std::string TextDecoder::decode(const std::string &value) {
    if (value.find('\x1b') == std::string::npos) return decodeOrReplace(codecs_[0], value);
    std::string out;
    size_t start = 0;
    while (start < value.size()) {
        size_t next = value.find('\x1b', start + 1);
        if (next == std::string::npos) next = value.size();
        std::string fragment = value.substr(start, next - start);
        out += fragment[0] == '\x1b' ? decodeEscaped(fragment)
                                     : decodeOrReplace(codecs_[0], fragment);
        start = next;
    }
    return out;
}

std::string TextDecoder::decodeEscaped(const std::string &fragment) {
    size_t length = startsWith(fragment, "\x1b$(") || startsWith(fragment, "\x1b$)") ? 4 : 3;
    const char *found = lookup(kEscapes, fragment.substr(0, length));
    std::string codec = found ? found : "";
    bool declared = false;
    for (const std::string &c : codecs_) declared = declared || c == codec;
    if (!declared && codec != "iso8859") return replacing(codecs_[0], fragment);
    if (inList(codec, kEscapeAware)) return decodeOrReplace(codec, fragment);
    std::string rest = fragment.substr(length);
    size_t delimiter = rest.find_first_of("\r\n\t\f");
    if (delimiter == std::string::npos) return decodeOrReplace(codec, rest);
    bool ok = true;
    std::string out = convert(codec, rest.substr(0, delimiter), ok);
    out += convert(codecs_[0], rest.substr(delimiter), ok);
    return ok ? out : replacing(codecs_[0], fragment);
}

std::string TextDecoder::decodeOrReplace(const std::string &codec, const std::string &bytes) {
    bool ok = true;
    std::string out = convert(codec, bytes, ok);
    return ok ? out : replacing(codecs_[0], bytes);
}

std::string TextDecoder::replacing(const std::string &codec, const std::string &bytes) {
    std::string out;
    for (size_t i = 0; i < bytes.size();) {
        bool done = false;
        for (size_t n = 1; n <= 4 && i + n <= bytes.size() && !done; ++n) {
            bool ok = true;
            std::string piece = convert(codec, bytes.substr(i, n), ok);
            if (ok) {
                out += piece;
                i += n;
                done = true;
            }
        }
        if (!done) {
            out += kReplacement;
            ++i;
        }
    }
    return out;
}

std::string TextDecoder::convert(const std::string &codec, const std::string &bytes, bool &ok) {
    if (isLatin1(codec)) return latin1ToUtf8(bytes);
    OFCharacterEncoding *encoder = encoder_for(codec);
    OFString converted;
    if (encoder == nullptr ||
        encoder->convertString(bytes.data(), bytes.size(), converted).bad()) {
        ok = false;
        return "";
    }
    return std::string(converted.c_str(), converted.length());
}

OFCharacterEncoding *TextDecoder::encoder_for(const std::string &codec) {
    for (auto &entry : encoders_)
        if (entry.first == codec) return entry.second.get();
    const char *name = lookup(kIconvNames, codec);
    auto encoder = std::make_unique<OFCharacterEncoding>();
    if (name == nullptr || encoder->selectEncoding(name, "UTF-8").bad())
        throw Unreadable(std::string("no character set conversion for ") + codec +
                         " (DCMTK built without iconv/ICU support for it)");
    encoders_.emplace_back(codec, std::move(encoder));
    return encoders_.back().second.get();
}

}  // namespace getdcmtags
