// Calendar days in an IANA time zone, with the browser's Intl: the console asks the
// API for ranges starting at a zone's midnight.

/** `YYYY-MM-DD` of `date` in `tz`. */
export function ymd(date, tz) {
  return new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit" }).format(date);
}

/** The UTC offset of `tz` at `date`, as `+08:00`. */
export function offset(date, tz) {
  const s = new Intl.DateTimeFormat("en-US", { timeZone: tz, timeZoneName: "longOffset" })
    .formatToParts(date)
    .find((p) => p.type === "timeZoneName").value;
  const m = /GMT([+-]\d\d:\d\d)?/.exec(s);
  return m && m[1] ? m[1] : "+00:00";
}

/** Midnight starting the day `day` (YYYY-MM-DD) in `tz`, as RFC 3339. */
export function dayStart(day, tz) {
  // The offset in force at midnight, not at noon: on a day summer time starts or ends
  // they differ. Guessed from noon, then taken at the instant the guess names.
  let off = offset(new Date(`${day}T12:00:00Z`), tz);
  for (let i = 0; i < 2; i++) {
    const at = offset(new Date(`${day}T00:00:00${off}`), tz);
    if (at === off) break;
    off = at;
  }
  return `${day}T00:00:00${off}`;
}
